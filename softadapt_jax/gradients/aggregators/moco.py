"""MoCo (multi-objective gradient correction), LibMTL's form.

Tracks each task's loss-scaled unit gradient with a moving average ``y`` and
the task weights ``lambda`` with a mirror-like step: LibMTL maps the step back
with a softmax, not the paper's simplex projection.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax._checks import all_finite, check_float
from softadapt_jax.gradients.aggregators._common import check_state_shape, stateful_aggregator
from softadapt_jax.gradients.aggregators._core import Aggregator

NAME = "moco"
_NORM_EPS = 1e-8  # LibMTL's guard in g_k / (||g_k|| + eps)


class MoCoState(NamedTuple):
    """The state of :func:`moco`.

    Attributes:
      step: int32 scalar, the number of completed calls.
      y: ``[K, n]`` the tracked gradients (start at 0).
      lambd: ``[K]`` the task weights (start at 1/K).
    """

    step: jax.Array
    y: jax.Array
    lambd: jax.Array


def moco_step(
    jacobian: jax.Array,
    losses: jax.Array,
    y: jax.Array,
    lambd: jax.Array,
    step: jax.Array,
    *,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One MoCo step at call ``step`` (1 for the first).

    ``h_k = L_k g_k / (||g_k|| + 1e-8)``;
    ``y <- y - (beta / t^beta_sigma) (y - h)``;
    ``lambda <- softmax(lambda - (gamma / t^gamma_sigma) (y y^T + rho I) lambda)``;
    ``d = y^T lambda``.

    Returns:
      ``(direction [n], y [K, n], lambd [K])``.
    """
    t = step.astype(jacobian.dtype)
    h = jacobian / (jnp.linalg.norm(jacobian, axis=-1, keepdims=True) + _NORM_EPS) * losses[:, None]
    y = y - (beta / t**beta_sigma) * (y - h)
    gram = jnp.matmul(y, y.T, precision=jax.lax.Precision.HIGHEST) + rho * jnp.eye(y.shape[0], dtype=y.dtype)
    lambd = jax.nn.softmax(lambd - (gamma / t**gamma_sigma) * (gram @ lambd))
    return jnp.matmul(lambd, y, precision=jax.lax.Precision.HIGHEST), y, lambd


def moco(
    *,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
) -> Aggregator:
    """MoCo: ``d = y^T lambda`` after one :func:`moco_step`.

    Paper: Fernando et al., "Mitigating Gradient Bias in Multi-objective
    Learning: A Provably Convergent Approach", ICLR 2023. Original
    implementation reproduced: LibMTL, ``LibMTL/weighting/MoCo.py`` (git
    4336804), ``rep_grad=False``; the weights are mapped back with a softmax
    as LibMTL does (the paper projects onto the simplex).

    Args:
      beta: the rate of ``y`` (LibMTL's ``MoCo_beta``, default 0.5).
      beta_sigma: its decay exponent (``MoCo_beta_sigma``, default 0.5).
      gamma: the step of ``lambda`` (``MoCo_gamma``, default 0.1).
      gamma_sigma: its decay exponent (``MoCo_gamma_sigma``, default 0.5).
      rho: the l2 regularisation of the ``lambda`` step (``MoCo_rho``, default 0).

    Returns:
      A stateful :class:`Aggregator` (state :class:`MoCoState`) that needs
      ``losses``; the weights LibMTL returns are ``state.lambd``.

    Non-finite data: a step whose Jacobian, losses or result are not finite is
    skipped: zero update, state unchanged.
    """
    opts = {
        name: check_float(v, name)
        for name, v in dict(
            beta=beta, beta_sigma=beta_sigma, gamma=gamma, gamma_sigma=gamma_sigma, rho=rho
        ).items()
    }

    def init(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> MoCoState:
        return MoCoState(
            step=jnp.zeros((), jnp.int32),
            y=jnp.zeros((num_tasks, dim), dtype),
            lambd=jnp.full((num_tasks,), 1.0 / num_tasks, dtype),
        )

    def advance(j: jax.Array, losses: jax.Array, state: MoCoState) -> tuple[jax.Array, MoCoState, jax.Array]:
        check_state_shape("y", state.y.shape, j.shape)
        step = state.step + 1
        d, y, lambd = moco_step(j, losses, state.y.astype(j.dtype), state.lambd.astype(j.dtype), step, **opts)
        new = MoCoState(step=step, y=y.astype(state.y.dtype), lambd=lambd.astype(state.lambd.dtype))
        return d, new, all_finite(j, losses, d, new)

    return stateful_aggregator(NAME, init, advance)


AGGREGATORS = {NAME: moco}
