"""Fixed weights: the non-adaptive baseline (plain summation by default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, _options, make_balancer


def fixed_balancer(
    weights: Any = None,
    *,
    num_losses: int,
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    dtype: Any = None,
    groups: Sequence[int] | None = None,
) -> Balancer:
    """Constant weights ``w_k`` (default all ones: the plain sum ``sum_k L_k``).

    The baseline every adaptive method is compared against: the total loss is
    ``sum_k w_k * setpoint_k * L_k`` at every step, from the first one on (the
    weights are the given ones already in ``init()``; there is no warm-up).
    The state still records the losses (history window 1), so it can be
    inspected and serialized like any other balancer's.

    The default reproduces LibMTL's Equal Weighting (``LibMTL/weighting/EW.py``,
    git 4336804): its loss is the plain *sum* of the task losses, every
    coefficient 1 (its docstring speaks of ``1/T``, its code multiplies by ones).
    Pass ``weights=np.full(K, 1 / K)`` for the mean.

    Args:
      weights: optional finite, non-negative, concrete weights, one per group
        (``[K]`` without ``groups``; default all ones).
      num_losses: K, the number of loss components.
      update_every, accumulate: accepted for a uniform interface; they only
        change how the losses are recorded, never the weights.
      setpoint: optional ``[K]`` non-negative per-term coefficients multiplying
        the weights.
      dtype: history dtype (float32 by default; float64 under x64).
      groups: optional length-K group ids (see
        :func:`~softadapt_jax.balancers.base.make_balancer`); ``weights`` then
        has one entry per group, shared by the group's terms.

    Returns:
      A :class:`~softadapt_jax.balancers.base.Balancer` with
      ``weights_sum = sum(weights)`` (G, the number of groups, by default; K
      without ``groups``); the weight of term k is ``weights[group_k] * setpoint_k``.

    Raises:
      ValueError: ``weights`` not of shape ``(G,)``, not finite or negative;
        invalid ``num_losses``, ``update_every``, ``accumulate``, ``setpoint``,
        ``dtype`` or ``groups``.
      TypeError: ``weights`` traced (they must be known when the balancer is
        built, since ``weights_sum`` is a Python float).
    """
    options = _options(num_losses, update_every, accumulate, setpoint, dtype, groups)
    k, g, ids, prior = options.num_losses, options.num_groups, options.groups, options.setpoint
    if weights is None:
        w = np.ones((g,))
    else:
        arr = _checks.as_float_array(weights, "weights")
        if isinstance(arr, jax.core.Tracer):
            raise TypeError("`weights` of fixed_balancer must be concrete (not traced).")
        w = np.asarray(arr, dtype=np.float64)
        if w.shape != (g,):
            what = f"num_losses={k}" if ids is None else f"the {g} groups of `groups`"
            raise ValueError(f"`weights` must have shape ({g},) to match {what}, got {w.shape}.")
        if not np.all(np.isfinite(w) & (w >= 0)):
            raise ValueError(f"`weights` must be finite and >= 0, got {w}.")
    per_term = w if ids is None else w[list(ids)]
    # The fixed weights act as a set-point on a rule that always returns ones:
    # the shared machinery then gives exactly ``weights * setpoint`` from init on.
    combined = jnp.asarray(per_term) if prior is None else jnp.asarray(per_term, prior.dtype) * prior

    def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
        del initial
        return jnp.ones(history.shape[1:], history.dtype), method_state

    options = options._replace(setpoint=combined)
    balancer = make_balancer(rule, **options._asdict(), window=1, weights_sum=float(g), name="fixed")
    return balancer._replace(weights_sum=float(np.sum(w)))
