"""DB-MTL (dual-balancing multi-task learning), LibMTL's form.

Loss-scale balancing by the log transform (gradients of ``log(L_k + 1e-8)``,
i.e. ``g_k / (L_k + 1e-8)``), an exponential moving average of those
gradients, and gradient-magnitude balancing: every averaged gradient is
rescaled to the largest norm among them before summing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax._checks import all_finite, check_float
from softadapt_jax.gradients.aggregators._common import check_state_shape, stateful_aggregator
from softadapt_jax.gradients.aggregators._core import Aggregator

NAME = "db_mtl"
_LOG_EPS = 1e-8  # LibMTL's shift inside log(L + eps)
_NORM_EPS = 1e-8  # LibMTL's guard in max_j ||b_j|| / (||b_k|| + eps)


class DBMTLState(NamedTuple):
    """The state of :func:`db_mtl`.

    Attributes:
      step: int32 scalar, the number of completed calls.
      grad_buffer: ``[K, n]`` the moving average of the log-loss gradients (starts at 0).
    """

    step: jax.Array
    grad_buffer: jax.Array


def db_mtl_weights(grad_buffer: jax.Array) -> jax.Array:
    """The coefficients ``alpha_k = max_j ||b_j|| / (||b_k|| + 1e-8)`` of the averaged gradients ``b``."""
    norms = jnp.linalg.norm(grad_buffer, axis=-1)
    return jnp.max(norms) / (norms + _NORM_EPS)


def db_mtl_buffer(
    jacobian: jax.Array,
    losses: jax.Array,
    grad_buffer: jax.Array,
    step: jax.Array,
    *,
    beta: float,
    beta_sigma: float,
) -> jax.Array:
    """The next moving average ``b_t = h + (beta / t^beta_sigma) (b_{t-1} - h)``.

    ``h_k = g_k / (L_k + 1e-8)`` is the gradient of ``log(L_k + 1e-8)``;
    ``step`` is ``t``, 1 for the first call (with ``b_0 = 0``, so ``b_1 = (1 - beta) h``).
    """
    h = jacobian / (losses + _LOG_EPS)[:, None]
    rate = beta / step.astype(jacobian.dtype) ** beta_sigma
    return h + rate * (grad_buffer - h)


def db_mtl(*, beta: float = 0.9, beta_sigma: float = 0.0) -> Aggregator:
    """DB-MTL: ``d = sum_k alpha_k b_k`` over the moving average ``b`` of the log-loss gradients.

    Paper: Lin et al., "Dual-Balancing for Multi-Task Learning", 2023
    (arXiv:2308.12029). Original implementation reproduced: LibMTL,
    ``LibMTL/weighting/DB_MTL.py`` (git 4336804), ``rep_grad=False``.
    (LibMTL's ``backward`` returns ones; the real coefficients are
    :func:`db_mtl_weights` on the buffer.)

    Args:
      beta: the moving-average rate (LibMTL's ``DB_beta``, default 0.9).
      beta_sigma: its decay exponent, the rate at call t being
        ``beta / t^beta_sigma`` (LibMTL's ``DB_beta_sigma``, default 0).

    Returns:
      A stateful :class:`Aggregator` (state :class:`DBMTLState`) that needs ``losses``.

    Non-finite data: a step whose Jacobian, losses or result are not finite is
    skipped: zero update, state unchanged.
    """
    beta = check_float(beta, "beta")
    beta_sigma = check_float(beta_sigma, "beta_sigma")

    def init(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> DBMTLState:
        return DBMTLState(step=jnp.zeros((), jnp.int32), grad_buffer=jnp.zeros((num_tasks, dim), dtype))

    def advance(
        j: jax.Array, losses: jax.Array, state: DBMTLState
    ) -> tuple[jax.Array, DBMTLState, jax.Array]:
        check_state_shape("grad_buffer", state.grad_buffer.shape, j.shape)
        step = state.step + 1
        buf = db_mtl_buffer(
            j, losses, state.grad_buffer.astype(j.dtype), step, beta=beta, beta_sigma=beta_sigma
        )
        d = jnp.matmul(db_mtl_weights(buf), buf, precision=jax.lax.Precision.HIGHEST)
        new = DBMTLState(step=step, grad_buffer=buf.astype(state.grad_buffer.dtype))
        return d, new, all_finite(j, losses, d, new)

    return stateful_aggregator(NAME, init, advance)


AGGREGATORS = {NAME: db_mtl}
