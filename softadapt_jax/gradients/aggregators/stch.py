"""STCH (smooth Tchebycheff scalarisation) with LibMTL's warm-up and nadir vector.

A loss-level method. During the first ``warmup_epoch`` epochs (and the
warm-up epoch itself) the combined loss is ``sum_k log L_k``; the losses seen
during epoch ``warmup_epoch`` are averaged into the nadir vector ``z``; after
it the combined loss is ``K mu logsumexp(log(L / z) / mu)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax._checks import all_finite, check_float, check_positive_int
from softadapt_jax.gradients.aggregators._common import commit_if, jacobian_and_losses
from softadapt_jax.gradients.aggregators._core import Aggregator

NAME = "stch"
# LibMTL adds this inside every log so that a zero loss gives log(1e-20), not -inf.
_LOG_EPS = 1e-20


class STCHState(NamedTuple):
    """The state of :func:`stch`.

    Attributes:
      step: int32 scalar, the number of completed calls (``epoch = step // steps_per_epoch``).
      loss_sum: ``[K]`` sum of the losses seen during the warm-up epoch.
      loss_count: int32 scalar, how many calls contributed to ``loss_sum``.
    """

    step: jax.Array
    loss_sum: jax.Array
    loss_count: jax.Array


def stch_nadir(state: STCHState) -> jax.Array:
    """The nadir vector ``loss_sum / loss_count`` (meaningful once the warm-up epoch is over)."""
    return state.loss_sum / jnp.maximum(state.loss_count, 1).astype(state.loss_sum.dtype)


def stch_weights(losses: jax.Array, nadir: jax.Array, smooth: jax.Array, *, mu: float = 1.0) -> jax.Array:
    """The coefficients ``c_k = dLoss/dL_k`` of STCH's combined loss.

    * ``smooth`` False (warm-up): ``Loss = sum_k log(L_k + 1e-20)``, ``c_k = 1 / (L_k + 1e-20)``.
    * ``smooth`` True: with ``l_k = log(L_k / z_k + 1e-20)``,
      ``Loss = K mu log sum_k exp(l_k / mu)`` and
      ``c_k = K softmax(l / mu)_k / (z_k (L_k / z_k + 1e-20))``.

    Args:
      losses: ``[K]`` task losses.
      nadir: ``[K]`` the nadir vector ``z`` (read only when ``smooth``).
      smooth: bool scalar, whether the warm-up is over.
      mu: the smoothing temperature (LibMTL's ``STCH_mu``).

    Returns:
      ``[K]`` coefficients.
    """
    k = losses.shape[0]
    warm = 1.0 / (losses + _LOG_EPS)
    safe_nadir = jnp.where(smooth, nadir, jnp.ones_like(nadir))
    ratio = losses / safe_nadir + _LOG_EPS
    soft = jax.nn.softmax(jnp.log(ratio) / mu)
    smoothed = k * soft / ratio / safe_nadir
    return jnp.where(smooth, smoothed, warm)


def stch(*, mu: float = 1.0, warmup_epoch: int = 4, steps_per_epoch: int = 1) -> Aggregator:
    """STCH: ``sum_k c_k g_k`` with the coefficients of :func:`stch_weights`.

    Paper: Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024. Original implementation reproduced: LibMTL,
    ``LibMTL/weighting/STCH.py`` (git 4336804), with its defaults
    (``STCH_mu=1.0``, ``STCH_warmup_epoch=4``).

    LibMTL reads the Trainer's epoch counter; an aggregator only sees calls, so
    the epoch is counted here as ``calls // steps_per_epoch`` (0-based), which
    is the Trainer's epoch when every epoch has ``steps_per_epoch`` batches.
    Epochs ``< warmup_epoch``: log-sum loss. Epoch ``== warmup_epoch``: the same
    loss, and the losses are accumulated. Later epochs: the smoothed
    Tchebycheff loss against their mean, the nadir vector (:func:`stch_nadir`).

    Args:
      mu: the temperature, > 0 (LibMTL's ``STCH_mu``).
      warmup_epoch: the warm-up epochs, >= 0 (LibMTL's ``STCH_warmup_epoch``).
      steps_per_epoch: calls per epoch, >= 1 (not a LibMTL option: see above).

    Returns:
      A stateful :class:`Aggregator` (state :class:`STCHState`) that needs ``losses``.

    Non-finite data: a step whose Jacobian, losses or result are not finite is
    skipped: zero update, state unchanged (the call is not counted).
    """
    mu = check_float(mu, "mu", low=0.0, low_open=True)
    warmup_epoch = check_positive_int(warmup_epoch, "warmup_epoch", minimum=0)
    steps_per_epoch = check_positive_int(steps_per_epoch, "steps_per_epoch")

    def init(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> STCHState:
        del dim
        # One buffer per field, so that a step may donate the state.
        return STCHState(
            step=jnp.zeros((), jnp.int32),
            loss_sum=jnp.zeros((num_tasks,), dtype),
            loss_count=jnp.zeros((), jnp.int32),
        )

    def update(
        jacobian: Any, state: STCHState, *, losses: Any = None, key: Any = None
    ) -> tuple[jax.Array, Any]:
        del key
        j, losses_ = jacobian_and_losses(jacobian, losses, NAME)
        epoch = state.step // steps_per_epoch
        smooth = epoch > warmup_epoch
        c = stch_weights(losses_, stch_nadir(state).astype(j.dtype), smooth, mu=mu)
        d = jnp.matmul(c, j, precision=jax.lax.Precision.HIGHEST)
        collect = epoch == warmup_epoch
        new = STCHState(
            step=state.step + 1,
            loss_sum=jnp.where(
                collect, state.loss_sum + losses_.astype(state.loss_sum.dtype), state.loss_sum
            ),
            loss_count=state.loss_count + collect.astype(jnp.int32),
        )
        ok = all_finite(j, losses_, d)
        return commit_if(ok, d, new, state)

    return Aggregator(name=NAME, init=init, update=update, stateful=True, needs_losses=True)


AGGREGATORS = {NAME: stch}
