"""SoftAdapt as a balancer: the weight functions of :mod:`softadapt_jax.weights` over a history window."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, _options, make_balancer
from softadapt_jax.slopes import resolve_accuracy_order
from softadapt_jax.weights import REFERENCE_EPS, VARIANTS, SoftAdaptOptions, Variant, _weights

SOFTADAPT_REFERENCES: tuple[str, ...] = ("initial", "window_mean")


def softadapt_balancer(
    beta: Any = 0.1,
    *,
    num_losses: int,
    variant: Variant = "loss_weighted",
    window: int = 5,
    accuracy_order: int | None = None,
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    relative_to: str = "initial",
    stencil: str = "forward",
    scale: str = "none",
    normalization: str = "sum",
    sum_to_k: bool = False,
    eps: float = REFERENCE_EPS,
    dtype: Any = None,
    groups: Sequence[int] | None = None,
) -> Balancer:
    """SoftAdapt weights recomputed from a window of recent losses.

    Args:
      beta: temperature (scalar, may be an array or traced, e.g. scheduled by
        ``optax.inject_hyperparams``).
      num_losses: K, the number of loss components.
      variant: ``"original"``, ``"normalized"`` or ``"loss_weighted"`` (the
        default here and in :func:`~softadapt_jax.softadapt`: the original
        README's recommendation for training; the pure
        :func:`~softadapt_jax.softadapt_weights` defaults to ``"original"``).
      window: number of history entries (T of :func:`softadapt_weights`), >= 2.
      accuracy_order: finite-difference order; ``None`` uses ``window - 1``.
      update_every: recompute the weights every n steps, hold them between.
      accumulate: average the losses of n steps into one history entry.
      setpoint: optional ``[K]`` prior coefficients multiplying the weights.
      relative_to: with ``scale="relative"``: ``"initial"`` divides each loss by
        its first recorded value, ``"window_mean"`` by its mean over the window.
      stencil, scale, normalization, sum_to_k, eps: see :class:`SoftAdaptOptions`.
      dtype: history dtype (float32 by default; float64 under x64).
      groups: optional length-K group ids (see :func:`make_balancer`): the
        weights are computed from the G group sums of the losses and shared
        by each group's terms.

    Returns:
      A :class:`Balancer` whose G group weights sum to 1 (G with
      ``sum_to_k``; G = K without ``groups``), times the set-point.
    """
    _checks.check_choice(variant, "variant", VARIANTS)
    _checks.check_choice(relative_to, "relative_to", SOFTADAPT_REFERENCES)
    opts = SoftAdaptOptions(
        stencil=stencil, scale=scale, normalization=normalization, sum_to_k=sum_to_k, eps=eps
    )
    window = _checks.check_positive_int(window, "window", minimum=2)
    resolve_accuracy_order(accuracy_order, window)
    options = _options(num_losses, update_every, accumulate, setpoint, dtype, groups)

    def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
        reference = initial if (opts.scale == "relative" and relative_to == "initial") else None
        b = _checks.check_scalar(beta, "beta").astype(history.dtype)
        weights = _weights(
            history, b, variant=variant, accuracy_order=accuracy_order, opts=opts, reference=reference
        )
        return weights, method_state

    weights_sum = float(options.num_groups) if opts.sum_to_k else 1.0
    return make_balancer(
        rule, **options._asdict(), window=window, weights_sum=weights_sum, name=f"softadapt_{variant}"
    )
