"""SoftAdapt on each loss's change since the previous step (PhysicsNeMo's and the ReLoBRaLo authors' forms).

Unlike :mod:`softadapt_jax.balancers.softadapt` (finite-difference slopes over
a window, the original paper), these weight each loss by a softmax of its
ratio to (or difference from) its previous value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, _options, make_balancer, safe_ratio
from softadapt_jax.weights import stable_softmax

RATIO_EPS = 1e-8
FORMS = ("ratio", "difference")


def ratio_softadapt_balancer(
    *,
    num_losses: int,
    form: str = "ratio",
    beta: float = 1.0,
    eps: float | None = None,
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    dtype: Any = None,
    groups: Sequence[int] | None = None,
) -> Balancer:
    """SoftAdapt on the step-to-step change of each loss: ``G * softmax(beta * s)``.

    With ``L(t)`` the newest history entry and G weights (one per group;
    ``G = K`` without ``groups``)::

        s_k = L_k(t) / (L_k(t-1) + eps)        form="ratio" (default)
        s_k = L_k(t) - L_k(t-1)                form="difference"
        w_k = G * e_k / (sum_j e_j + eps'),    e_k = exp(beta * s_k - max_j beta * s_j)

    so the weights sum to G (up to ``eps'``; uniform weights are plain
    summation) and grow for the losses that fell least or rose.

    Forms:

    * ``"ratio"``: NVIDIA PhysicsNeMo-Sym 2.4.0 (formerly Modulus-Sym),
      ``physicsnemo/sym/loss/aggregator.py`` ``SoftAdapt``: ``beta = 1`` (it has
      no temperature) and ``eps = eps' = 1e-8``, in the ratio's denominator and
      in the softmax's sum. Window 2: ``L(t-1)`` is the previous history entry;
      the first step keeps the uniform weights (1 each), as its step 0 sums
      the losses. ``L_k(t-1) = 0`` gives the ratio ``L_k(t) / eps``; with
      ``eps = 0`` it is ``+inf`` (clipped to the largest float, so the weights
      stay finite), or 1 if ``L_k(t)`` is 0 too.
    * ``"difference"``: the ReLoBRaLo authors' ``softadapt``
      (github.com/rbischof/relative_balancing at commit b3c76d2,
      ``src/update_rules.py``, as ``src/train.py`` runs it: its moving average
      fixed at 0, so the weights are the softmax itself). ``beta`` is its
      ``T`` (multiplying the differences), ``eps' = eps = 0`` by default (an
      exact softmax). ``L(t-1)`` is the losses of the previous recompute, the
      placeholder 1.0 at the first one (which therefore already adapts:
      ``G * softmax(beta * (L(0) - 1))``). Window 1; ``method_state`` is
      ``{"prev": [G]}``.

    Timing: both references apply the weights computed from ``L(t)`` to the
    loss of the same step ``t``. Here, as for every balancer, the weights
    returned by ``update(L(t))`` are meant for step ``t+1``; the weights
    themselves are the references' of step ``t``.

    Reference: Heydari, Thompson & Mehmood (2019), arXiv:1912.12355, in the
    loss-ratio form of PhysicsNeMo and the loss-difference form of Bischof &
    Kraus (2021), arXiv:2110.09813.

    Args:
      num_losses: K, the number of loss terms.
      form: ``"ratio"`` (default, PhysicsNeMo) or ``"difference"`` (the
        ReLoBRaLo authors' code).
      beta: multiplies the scores ``s`` (a finite real; 1 in PhysicsNeMo).
      eps: >= 0. ``"ratio"``: added to the previous loss and to the softmax's
        sum (default ``1e-8``); ``"difference"``: added to the softmax's sum
        (default 0).
      update_every: recompute the weights every n steps, hold them between.
      accumulate: average the losses of n steps into one history entry (the
        scores then compare consecutive averages).
      setpoint: optional ``[K]`` non-negative coefficients multiplying the weights.
      dtype: history dtype (float32 by default; float64 under x64).
      groups: optional length-K group ids; the terms of a group share one
        weight, computed from their summed loss.

    Returns:
      A :class:`~softadapt_jax.balancers.base.Balancer` with
      ``weights_sum = G``.

    Raises:
      ValueError: unknown ``form``; ``beta`` not finite; ``eps`` negative or
        not finite; invalid ``num_losses``, ``groups``, ``update_every``,
        ``accumulate``, ``setpoint`` or ``dtype``.
    """
    options = _options(num_losses, update_every, accumulate, setpoint, dtype, groups)
    g = options.num_groups
    form = _checks.check_choice(form, "form", FORMS)
    beta = _checks.check_float(beta, "beta")
    default_eps = RATIO_EPS if form == "ratio" else 0.0
    eps = _checks.check_float(default_eps if eps is None else eps, "eps", low=0.0)

    def weights(scores: jax.Array) -> jax.Array:
        return g * stable_softmax(scores, beta, eps=eps)

    if form == "ratio":

        def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
            del initial
            return weights(safe_ratio(history[-1], history[-2], eps)), method_state

        window, init_method_state = 2, ()
    else:

        def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
            del initial
            return weights(history[-1] - method_state["prev"]), {"prev": history[-1]}

        window, init_method_state = 1, {"prev": jnp.ones((g,), options.dtype)}

    return make_balancer(
        rule,
        **options._asdict(),
        window=window,
        weights_sum=float(g),
        name="ratio_softadapt" if form == "ratio" else "difference_softadapt",
        init_method_state=init_method_state,
    )
