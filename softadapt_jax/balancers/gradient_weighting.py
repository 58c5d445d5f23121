"""Gradient-statistics weightings PINN codes ship: learning-rate annealing, gradient norm, NTK.

All three recompute their weights every ``update_every`` steps from a
statistic of the per-component gradients (:mod:`softadapt_jax.statistics`)
and smooth them with a moving average. The statistic is needed only on the
recompute steps; the state's ``recompute_next`` says when, and
:func:`softadapt_jax.training.make_train_step` computes it under ``lax.cond``
(:func:`softadapt_jax.training.jit_train_step`: in a separately compiled step
chosen on the host), so all other steps cost one backward pass.

Weights start at 1 each (plain summation) and do not sum to a constant.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, make_balancer, resolve_dtype

LR_ANNEALING_MODES: tuple[str, ...] = ("max", "mean")


@flax.struct.dataclass
class GradientWeightingState:
    """Method state of the gradient-statistics balancers.

    Attributes:
      ema: ``[K]`` moving average of the weights (before any set-point).
      statistic: static name of the gradient statistic the method needs.
      statistic_options: static keyword arguments of
        :func:`softadapt_jax.statistics.compute_statistic`, as ``(name, value)`` pairs.
      schedule: static ``(window, update_every, accumulate)`` of the balancer,
        from which a host loop predicts the recompute steps without reading the
        device (:func:`softadapt_jax.training.jit_train_step`); ``None``: unknown.
    """

    ema: jax.Array
    statistic: str = flax.struct.field(pytree_node=False, default="grad_norm")
    statistic_options: tuple[tuple[str, Any], ...] = flax.struct.field(pytree_node=False, default=())
    schedule: tuple[int, int, int] | None = flax.struct.field(pytree_node=False, default=None)


def _ema_rule(estimate_fn: Any, keep: float) -> Any:
    """A weight rule: ``ema = keep * ema + (1 - keep) * estimate(statistic)``.

    Where the estimate is not finite (a zero gradient in a denominator), the
    previous average is kept for that component.
    """

    def rule(history: jax.Array, initial: jax.Array, ms: GradientWeightingState, stats: jax.Array):
        del history, initial
        est = estimate_fn(stats.astype(ms.ema.dtype))
        est = jnp.where(jnp.isfinite(est), est, ms.ema)
        ema = keep * ms.ema + (1.0 - keep) * est
        return ema, ms.replace(ema=ema)

    return rule


def _make(
    name: str,
    statistic: str,
    estimate_fn: Any,
    keep: float,
    num_losses: int,
    update_every: int,
    setpoint: Any,
    dtype: Any,
    statistic_options: tuple[tuple[str, Any], ...] = (),
) -> Balancer:
    k = _checks.check_positive_int(num_losses, "num_losses")
    update_every = _checks.check_positive_int(update_every, "update_every")
    hist_dtype = resolve_dtype(dtype)
    return make_balancer(
        _ema_rule(estimate_fn, keep),
        num_losses=k,
        window=1,
        weights_sum=float(k),
        init_method_state=GradientWeightingState(
            ema=jnp.ones((k,), hist_dtype),
            statistic=statistic,
            statistic_options=statistic_options,
            schedule=(1, update_every, 1),
        ),
        update_every=update_every,
        setpoint=setpoint,
        dtype=dtype,
        name=name,
        statistic=statistic,
    )


def lr_annealing_balancer(
    *,
    num_losses: int,
    alpha: float = 0.9,
    mode: str = "max",
    reference: int = 0,
    update_every: int = 10,
    setpoint: Any = None,
    dtype: Any = None,
) -> Balancer:
    """Learning-rate annealing (Wang, Teng & Perdikaris 2021, arXiv:2001.04536).

    ``λ̂_k = max|∇θ L_ref| / mean|∇θ L_k|`` (``mode="max"``, the paper's
    Algorithm 1 and the authors' code) or ``mean|∇θ L_ref| / mean|∇θ L_k|``
    (``mode="mean"``, as NVIDIA Modulus offers), then
    ``λ_k ← (1 - α) λ_k + α λ̂_k``; the reference loss (the PDE residual,
    component ``reference``) keeps weight 1. The gradients in the denominator
    are those of the *unweighted* losses, as in the authors' code (with
    ``λ_k`` inside, the fixed point would be the square root of the ratio).

    Args:
      num_losses: K.
      alpha: the weight of the new estimate, 0.9 as in the paper.
      mode: ``"max"`` or ``"mean"``.
      reference: index of the reference loss.
      update_every: recompute every n steps (the paper: 10).
      setpoint: optional ``[K]`` prior coefficients.
      dtype: state dtype.

    Returns:
      A :class:`Balancer` needing the ``"grad_abs"`` statistic.
    """
    _checks.check_choice(mode, "mode", LR_ANNEALING_MODES)
    k = _checks.check_positive_int(num_losses, "num_losses")
    if isinstance(reference, bool) or not isinstance(reference, int) or not 0 <= reference < k:
        raise ValueError(f"`reference` must be an index in [0, {k}), got {reference!r}.")
    alpha = _checks.check_float(alpha, "alpha", low=0.0, high=1.0)

    def estimate(stats: jax.Array) -> jax.Array:
        numerator = stats[reference, 0] if mode == "max" else stats[reference, 1]
        lam = numerator / stats[:, 1]
        return lam.at[reference].set(1.0)

    return _make("lr_annealing", "grad_abs", estimate, 1.0 - alpha, k, update_every, setpoint, dtype)


def grad_norm_balancer(
    *,
    num_losses: int,
    momentum: float = 0.9,
    update_every: int = 100,
    setpoint: Any = None,
    dtype: Any = None,
) -> Balancer:
    """Gradient-norm weighting as in jaxpi (Wang et al. 2023, arXiv:2308.08468).

    ``ŵ_k = (Σ_j ||∇θ L_j||) / ||∇θ L_k||``, ``w ← m w + (1 - m) ŵ``, so that
    every weighted loss contributes a gradient of the same norm.

    Args:
      num_losses: K.
      momentum: ``m``, 0.9 as jaxpi.
      update_every: recompute every n steps (jaxpi's default is 1000; 100
        here suits runs of a few thousand steps).
      setpoint: optional ``[K]`` prior coefficients.
      dtype: state dtype.

    Returns:
      A :class:`Balancer` needing the ``"grad_norm"`` statistic.
    """
    momentum = _checks.check_float(momentum, "momentum", low=0.0, high=1.0)

    def estimate(norms: jax.Array) -> jax.Array:
        return jnp.sum(norms) / norms

    return _make("grad_norm", "grad_norm", estimate, momentum, num_losses, update_every, setpoint, dtype)


def ntk_balancer(
    *,
    num_losses: int,
    momentum: float = 0.9,
    update_every: int = 100,
    max_points: int | None = 128,
    setpoint: Any = None,
    dtype: Any = None,
) -> Balancer:
    """NTK weighting (Wang, Yu & Perdikaris 2022, arXiv:2007.14527), as in jaxpi.

    ``ŵ_k = (Σ_j tr K_j) / tr K_k`` with ``tr K_k`` the mean over loss k's
    points of the squared per-point gradient norm, ``w ← m w + (1 - m) ŵ``.
    Needs ``residuals_fn`` in the train step.

    Args:
      num_losses: K.
      momentum: ``m``, 0.9 as jaxpi.
      update_every: recompute every n steps.
      max_points: estimate each trace from at most this many points (the
        first rows of every batch leaf; ``None``: as many as the smallest leaf
        has). Each point costs K one-row VJPs, one per residual term (each
        through that term's part of the network pass only, when the terms
        are computed apart), so a recompute step's cost grows linearly with it.
      setpoint: optional ``[K]`` prior coefficients.
      dtype: state dtype.

    Returns:
      A :class:`Balancer` needing the ``"ntk_trace"`` statistic.
    """
    momentum = _checks.check_float(momentum, "momentum", low=0.0, high=1.0)
    if max_points is not None:
        _checks.check_positive_int(max_points, "max_points")

    def estimate(traces: jax.Array) -> jax.Array:
        return jnp.sum(traces) / traces

    return _make(
        "ntk",
        "ntk_trace",
        estimate,
        momentum,
        num_losses,
        update_every,
        setpoint,
        dtype,
        statistic_options=(("max_points", max_points),),
    )
