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

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, make_balancer
from softadapt_jax.weights import stable_softmax

RATIO_EPS = 1e-8


def check_float(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Returns a finite real hyperparameter as a Python float, or raises.

    Raises:
      TypeError: ``value`` is not a real number (bools and traced values included).
      ValueError: ``value`` is not finite or outside the interval, with the
        interval and the value in the message.
    """
    if (
        isinstance(value, (jax.Array, np.ndarray))
        and value.ndim == 0
        and not isinstance(value, jax.core.Tracer)
    ):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a real number, got {value!r} of type {type(value).__name__}.")
    v = float(value)
    ok = math.isfinite(v)
    if low is not None:
        ok = ok and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        if low is not None and high is not None:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            interval = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            interval = f"{'<' if high_open else '<='} {high:g}"
        else:
            interval = "finite"
        raise ValueError(f"`{name}` must be a finite number {interval}, got {value!r}.")
    return v


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """The history dtype :func:`make_balancer` will use (for method states built up front)."""
    hist_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    if not jnp.issubdtype(hist_dtype, jnp.floating) or jnp.finfo(hist_dtype).bits < 32:
        raise ValueError(f"`dtype` must be float32 or float64, got {hist_dtype}.")
    return hist_dtype


def safe_ratio(num: jax.Array, den: jax.Array, eps: float) -> jax.Array:
    """``num / (den + eps)``, defined everywhere.

    Where ``den + eps == 0`` (only possible with ``eps = 0`` or negative
    losses) the ratio is 1 if ``num == 0`` too (no change) and ``sign(num) * inf``
    otherwise; :func:`~softadapt_jax.weights.stable_softmax` clips infinities to
    the largest finite float, so the weights stay finite.
    """
    d = den + eps
    zero = d == 0
    inf_or_one = jnp.where(num == 0, jnp.ones_like(num), jnp.sign(num) * jnp.inf)
    return jnp.where(zero, inf_or_one, num / jnp.where(zero, jnp.ones_like(d), d))


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
    eps = check_float(eps, "eps", low=0.0)

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
