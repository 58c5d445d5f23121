"""Loss-ratio SoftAdapt as in NVIDIA Modulus, and helpers shared by the ratio-based balancers.

Modulus' ``SoftAdapt`` aggregator (``modulus.sym.loss.aggregator.SoftAdapt``)
weights the losses by a softmax of the *ratio* of each loss to its previous
value, rather than by the finite-difference slopes of the original SoftAdapt
paper (:mod:`softadapt_jax.balancers.softadapt`).

The helpers :func:`safe_ratio`, :func:`check_float` and :func:`resolve_dtype`
are shared with :mod:`~softadapt_jax.balancers.relobralo`,
:mod:`~softadapt_jax.balancers.dwa`, :mod:`~softadapt_jax.balancers.uncertainty`
and :mod:`~softadapt_jax.balancers.rlw`.
"""

from __future__ import annotations

from typing import Any

import jax

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, make_balancer, safe_ratio
from softadapt_jax.weights import stable_softmax

RATIO_EPS = 1e-8


def ratio_softadapt_balancer(
    *,
    num_losses: int,
    eps: float = RATIO_EPS,
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    dtype: Any = None,
) -> Balancer:
    """SoftAdapt on loss ratios, as NVIDIA Modulus implements it.

    With ``r_k = L_k(t) / (L_k(t-1) + eps)`` (``L(t)`` the newest history entry,
    ``L(t-1)`` the one before)::

        w_k = K * exp(r_k - max_j r_j) / sum_i exp(r_i - max_j r_j)

    so the weights sum to K (uniform weights equal plain summation) and grow
    for the losses that fell least (or rose) since the previous entry. Window 2,
    recomputed at every step by default.

    Differences from Modulus (``modulus.sym.loss.aggregator.SoftAdapt``,
    ``eps=1e-8``): Modulus applies the weights computed from ``L(t)`` to the
    loss of the same step ``t``; here, as for every balancer, the weights
    computed after step t are used at step t+1. Modulus also adds ``eps`` to the
    softmax denominator; here the softmax is exact (a relative difference below
    ``eps``, since the max-shifted sum is >= 1). ``L_k(t-1) = 0`` gives the
    ratio ``L_k(t) / eps`` (as in Modulus); with ``eps = 0`` it is ``+inf``
    (clipped to the largest float, so the weights stay finite), or 1 if
    ``L_k(t)`` is 0 too.

    Reference: Heydari, Thompson & Mehmood (2019), arXiv:1912.12355, in the
    loss-ratio form of NVIDIA Modulus (Modulus Sym ``SoftAdapt`` aggregator).

    Args:
      num_losses: K, the number of loss components.
      eps: added to the previous loss in the ratio's denominator (>= 0,
        default ``1e-8`` as Modulus).
      update_every: recompute the weights every n steps, hold them between.
      accumulate: average the losses of n steps into one history entry (the
        ratio is then between consecutive averages).
      setpoint: optional ``[K]`` non-negative coefficients multiplying the weights.
      dtype: history dtype (float32 by default; float64 under x64).

    Returns:
      A :class:`~softadapt_jax.balancers.base.Balancer` (``weights_sum = K``)
      whose weights sum to K, times the set-point.

    Raises:
      ValueError: ``eps`` negative or not finite; invalid ``num_losses``,
        ``update_every``, ``accumulate``, ``setpoint`` or ``dtype``.
    """
    k = _checks.check_positive_int(num_losses, "num_losses")
    eps = _checks.check_float(eps, "eps", low=0.0)

    def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
        del initial
        r = safe_ratio(history[-1], history[-2], eps)
        return k * stable_softmax(r, 1.0, eps=0.0), method_state

    return make_balancer(
        rule,
        num_losses=k,
        window=2,
        weights_sum=float(k),
        update_every=update_every,
        accumulate=accumulate,
        setpoint=setpoint,
        dtype=dtype,
        name="ratio_softadapt",
    )
