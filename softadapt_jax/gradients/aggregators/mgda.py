"""MGDA as torchjd's Frank-Wolfe Gramian weighting (torchjd's ``MGDA``)."""

from __future__ import annotations

import jax

from softadapt_jax._checks import check_float, check_positive_int
from softadapt_jax.gradients.aggregators._core import Aggregator, from_weighting
from softadapt_jax.gradients.combiners import mgda_weights as _combiner_mgda_weights


def mgda_weights(gramian: jax.Array, *, epsilon: float = 1e-3, max_iters: int = 100) -> jax.Array:
    """MGDA's weights: Frank-Wolfe towards ``argmin_{w in simplex} w^T G w``, stopped early.

    Starts at ``1/K``; each step moves towards the vertex ``e_t``,
    ``t = argmin (G w)_t``, with the exact line search on the segment, and the
    loop stops after a step ``gamma < epsilon`` (that step is kept) or after
    ``max_iters`` steps. So the weights are on the simplex but only
    approximately the min-norm point. No normalisation of G; a zero row takes
    all the weight.

    Paper: Désidéri, "Multiple-gradient descent algorithm (MGDA) for
    multiobjective optimization" (2012); solver: Sener & Koltun, "Multi-Task
    Learning as Multi-Objective Optimization" (NeurIPS 2018), Algorithm 2.
    Original implementation reproduced: torchjd 0.18.0,
    ``torchjd/aggregation/_mgda.py`` (``MGDAWeighting``), through
    :func:`softadapt_jax.gradients.combiners.mgda_weights` with
    ``convention="torchjd"``.

    Args:
      gramian: ``[K, K]`` Gramian.
      epsilon: the step length below which the loop stops (> 0).
      max_iters: iteration cap (static, >= 1).

    Returns:
      ``[K]`` weights on the simplex. A NaN Gramian gives NaN weights.
    """
    return _combiner_mgda_weights(gramian, convention="torchjd", max_iters=max_iters, tol=epsilon)


def mgda(*, epsilon: float = 1e-3, max_iters: int = 100) -> Aggregator:
    """torchjd's ``MGDA(epsilon, max_iters)`` (see :func:`mgda_weights`).

    For LibMTL's MGDA (its own min-norm solver and gradient normalisations)
    use :func:`softadapt_jax.gradients.mgda`.

    Returns:
      A stateless Gramian-weighting :class:`Aggregator` named ``"mgda"``.
    """
    epsilon = check_float(epsilon, "epsilon", low=0.0, low_open=True)
    max_iters = check_positive_int(max_iters, "max_iters")
    return from_weighting("mgda", lambda g: mgda_weights(g, epsilon=epsilon, max_iters=max_iters))


AGGREGATORS = {"mgda": mgda}
