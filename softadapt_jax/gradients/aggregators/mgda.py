"""MGDA, the minimum-norm point of the convex hull of the gradients: every convention and normalisation.

Paper: Désidéri, "Multiple-gradient descent algorithm (MGDA) for
multiobjective optimization" (2012); the min-norm solver and the gradient
normalisations: Sener & Koltun, "Multi-Task Learning as Multi-Objective
Optimization" (NeurIPS 2018, arXiv:1810.04650).

The weights ``w = argmin_{w in simplex} ||sum_k w_k u_k||^2`` of the
normalised gradients ``u_k = g_k / n_k`` depend on the gradients only through
their Gramian. Conventions (the solvers live in
``softadapt_jax.gradients.aggregators._simplex``):

* ``"torchjd"`` (this registry's default): torchjd 0.18.0
  ``torchjd/aggregation/_mgda.py`` (``MGDAWeighting``), Frank-Wolfe from
  ``1/K`` with exact line search, stopped after a step below ``epsilon``
  (1e-3) or ``max_iters`` (100) steps;
* ``"libmtl"``: LibMTL git 4336804 ``LibMTL/weighting/MGDA.py``
  (``_find_min_norm_element``, Sener & Koltun's ``MinNormSolver``) iteration
  for iteration, ``epsilon`` its ``STOP_CRIT`` (1e-5), ``max_iters`` its
  ``MAX_ITER`` (250); the default of :func:`softadapt_jax.gradients.mgda`;
* ``"exact"`` (no reference's): the minimiser to float precision (tolerance
  1e-6 on the duality gap, 250 iterations).

Normalisations (``n_k``, LibMTL's ``mgda_gn``): ``"none"``, ``"l2"``
(``||g_k||``), ``"loss"`` (``L_k``), ``"loss+"`` (``L_k ||g_k||``); and
``combine``: ``"normalized"`` (``d = sum_k w_k g_k / n_k``, LibMTL) or
``"raw"`` (``d = sum_k w_k g_k``, Sener & Koltun's training script).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_choice, check_float, check_positive_int
from softadapt_jax.gradients.aggregators import _simplex
from softadapt_jax.gradients.aggregators._core import (
    Aggregator,
    check_jacobian,
    check_losses,
    combine_rows,
    from_weighting,
    gramian_of,
    no_state,
)
from softadapt_jax.gradients.aggregators.optax_adapter import ScaleFreeWeighting

MGDA_CONVENTIONS = ("libmtl", "torchjd", "exact")
MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
MGDA_COMBINES = ("normalized", "raw")
# Each solver's own (max_iters, tol): LibMTL's MAX_ITER/STOP_CRIT, torchjd's max_iters/epsilon.
_SOLVER_DEFAULTS = {"libmtl": (250, 1e-5), "torchjd": (100, 1e-3), "exact": (250, 1e-6)}
_NORM_FLOOR = 1e-20  # the normalisers' floor: 0/0 is read as 0


def mgda_normalizers(gram: jax.Array, normalization: str, losses: jax.Array | None = None) -> jax.Array:
    """MGDA's gradient normalisers ``n_k`` (module docstring), floored at 1e-20.

    Args:
      gram: ``[K, K]`` Gramian (its diagonal gives ``||g_k||^2``).
      normalization: ``"none"`` (ones), ``"l2"`` (``||g_k||``), ``"loss"``
        (``L_k``) or ``"loss+"`` (``L_k ||g_k||``).
      losses: ``[K]`` component losses, for the loss-based forms.

    Returns:
      ``[K]`` normalisers. With the Gramian route, LibMTL's update is
      ``sum_k w_k / n_k g_k`` with ``w`` the min-norm weights of :func:`normalize_gramian`.
    """
    check_choice(normalization, "normalization", MGDA_NORMALIZATIONS)
    if normalization == "none":
        return jnp.ones(gram.shape[:1], gram.dtype)
    if normalization != "l2" and losses is None:
        raise ValueError(f"normalization={normalization!r} needs `losses`.")
    floor = jnp.asarray(_NORM_FLOOR, gram.dtype)
    # Floored after the square root: the square of the floor (1e-40) is subnormal, which XLA on
    # CPU flushes to 0 in float32, and a zero norm would make 0/0 of a zero gradient.
    norms = jnp.maximum(jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0)), floor)
    if normalization == "l2":
        return norms
    n = jnp.asarray(losses, gram.dtype)
    if normalization == "loss+":
        n = n * norms
    return jnp.maximum(n, floor)


def normalize_gramian(gram: jax.Array, normalization: str, losses: jax.Array | None = None) -> jax.Array:
    """The Gramian of the normalised gradients ``g_k / n_k``: ``G_ij / (n_i n_j)``.

    Args:
      gram: ``[K, K]`` Gramian.
      normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``
        (:func:`mgda_normalizers`).
      losses: ``[K]`` component losses, for the loss-based forms.

    Returns:
      The ``[K, K]`` normalised Gramian (``gram`` itself for ``"none"``).
    """
    if normalization == "none":
        return gram
    n = mgda_normalizers(gram, normalization, losses)
    return _divide_gramian(gram, n)


def _divide_gramian(gram: jax.Array, n: jax.Array) -> jax.Array:
    # G_ij / (n_i n_j), and 0 where the product of two floored normalisers (1e-40) is flushed to
    # 0: there |G_ij| <= n_i n_j is flushed too, and 0/0 would be nan.
    den = n[:, None] * n[None, :]
    return jnp.where(den > 0, gram / jnp.where(den > 0, den, 1.0), 0.0)


def _min_norm_weights(gram: jax.Array, *, convention: str, max_iters: int, tol: float) -> jax.Array:
    """The convention's weights on the simplex for ``[K, K]`` ``gram`` (``[1]`` for K = 1)."""
    k = gram.shape[0]
    dtype = gram.dtype
    if k == 1:
        return jnp.ones((1,), dtype)
    if convention == "libmtl":
        return _simplex.libmtl_min_norm(gram, max_iters, tol)
    if convention == "torchjd":
        return _simplex.torchjd_frank_wolfe(gram, max_iters, tol)
    scale = jnp.max(jnp.diag(gram))
    g = gram / jnp.where(scale > 0, scale, 1.0)
    if k == 2:
        t = _simplex.min_norm_2(g[0, 0], g[0, 1], g[1, 1])
        w = jnp.stack([t, 1.0 - t])
    else:
        w = _simplex.exact_frank_wolfe(g, max_iters, tol)
        w = _simplex.polish_on_face(g, w)
    # All-zero gradients: every w is optimal; uniform keeps the rule permutation-equivariant.
    return jnp.where(scale > 0, w, jnp.full((k,), 1.0 / k, dtype)).astype(dtype)


def _normalized_weights(
    gram: jax.Array, losses: jax.Array | None, *, normalization: str, combine: str, **solver: Any
) -> jax.Array:
    """The coefficients of the raw gradients: ``w / n`` (``combine="normalized"``) or ``w``."""
    if normalization == "none":
        return _min_norm_weights(gram, **solver)
    n = mgda_normalizers(gram, normalization, losses)
    w = _min_norm_weights(_divide_gramian(gram, n), **solver)
    return w / n if combine == "normalized" else w


def mgda_weights(gramian: jax.Array, *, epsilon: float = 1e-3, max_iters: int = 100) -> jax.Array:
    """MGDA's weights in torchjd's form: Frank-Wolfe towards ``argmin_{w in simplex} w^T G w``, stopped early.

    Starts at ``1/K``; each step moves towards the vertex ``e_t``,
    ``t = argmin (G w)_t``, with the exact line search on the segment, and the
    loop stops after a step ``gamma < epsilon`` (that step is kept) or after
    ``max_iters`` steps. So the weights are on the simplex but only
    approximately the min-norm point. No normalisation of G; a zero row takes
    all the weight.

    Original implementation reproduced: torchjd 0.18.0,
    ``torchjd/aggregation/_mgda.py`` (``MGDAWeighting``). LibMTL's solver:
    :func:`softadapt_jax.gradients.mgda_weights`.

    Args:
      gramian: ``[K, K]`` Gramian.
      epsilon: the step length below which the loop stops (> 0).
      max_iters: iteration cap (static, >= 1).

    Returns:
      ``[K]`` weights on the simplex. A NaN Gramian gives NaN weights.
    """
    epsilon = check_float(epsilon, "epsilon", low=0.0)
    max_iters = check_positive_int(max_iters, "max_iters")
    return _min_norm_weights(gramian, convention="torchjd", max_iters=max_iters, tol=epsilon)


def mgda(
    *,
    epsilon: float | None = None,
    max_iters: int | None = None,
    convention: str = "torchjd",
    normalization: str = "none",
    combine: str = "normalized",
) -> Aggregator:
    """torchjd's ``MGDA(epsilon, max_iters)``, with LibMTL's solver and normalisations as options.

    The defaults are torchjd's (:func:`mgda_weights`). LibMTL's ``MGDA`` is
    ``mgda(convention="libmtl", normalization=...)`` (the optax transform
    :func:`softadapt_jax.gradients.mgda` is that aggregator through
    :func:`~softadapt_jax.gradients.aggregators.optax_adapter.aggregate`).

    Args:
      epsilon: the solver's stopping tolerance (torchjd's ``epsilon``, > 0;
        LibMTL's ``STOP_CRIT`` and the exact solver's gap, >= 0); ``None``: the
        convention's own (1e-3, 1e-5, 1e-6).
      max_iters: iteration cap (static); ``None``: the convention's own (100,
        250, 250).
      convention: ``"torchjd"`` (default), ``"libmtl"`` or ``"exact"`` (module
        docstring).
      normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"``
        (:func:`mgda_normalizers`); the loss-based ones read ``losses=`` and
        assume positive losses.
      combine: ``"normalized"`` (default) or ``"raw"`` (module docstring).

    Returns:
      A stateless Gramian-weighting :class:`Aggregator` named ``"mgda"``; its
      ``weighting`` takes ``losses=`` for the loss-based normalisations.
    """
    check_choice(convention, "convention", MGDA_CONVENTIONS)
    default_iters, default_tol = _SOLVER_DEFAULTS[convention]
    if epsilon is not None:
        # torchjd requires epsilon > 0; the other solvers run to max_iters with 0.
        epsilon = check_float(epsilon, "epsilon", low=0.0, low_open=convention == "torchjd")
    if max_iters is not None:
        max_iters = check_positive_int(max_iters, "max_iters")
    check_choice(normalization, "normalization", MGDA_NORMALIZATIONS)
    check_choice(combine, "combine", MGDA_COMBINES)
    return _build(
        convention=convention,
        max_iters=default_iters if max_iters is None else max_iters,
        tol=default_tol if epsilon is None else epsilon,
        normalization=normalization,
        combine=combine,
    )


def _build(*, convention: str, max_iters: int, tol: float, normalization: str, combine: str) -> Aggregator:
    """The MGDA aggregator of already validated options (:func:`mgda` checks them)."""
    solver = {"convention": convention, "max_iters": max_iters, "tol": tol}
    if normalization == "none":
        return from_weighting("mgda", lambda g: _min_norm_weights(g, **solver))
    needs_losses = normalization in ("loss", "loss+")

    def weighting(gramian: jax.Array, *, losses: Any = None) -> jax.Array:
        return _normalized_weights(gramian, losses, normalization=normalization, combine=combine, **solver)

    def update(jacobian: Any, state: Any, *, losses: Any = None, key: Any = None) -> tuple[jax.Array, Any]:
        del key
        j = check_jacobian(jacobian)
        losses = check_losses(losses, j.shape[0], "mgda") if needs_losses else None
        w = weighting(gramian_of(j), losses=losses)
        return combine_rows(w, j), state

    # w_k / ||g_k||: the direction does not scale with the gradients (the optax adapter must not
    # multiply back the power of two it scaled them by).
    by_norm = normalization in ("l2", "loss+") and combine == "normalized"
    rule = ScaleFreeWeighting(weighting) if by_norm else weighting
    return Aggregator(name="mgda", init=no_state, update=update, weighting=rule, needs_losses=needs_losses)


AGGREGATORS = {"mgda": mgda}
