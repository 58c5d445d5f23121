"""IMTL (impartial multi-task learning) in LibMTL's hybrid form, IMTL-G + IMTL-L.

IMTL-L: learnable log-scales ``s`` turn each loss into ``exp(s_k) L_k - s_k``,
so the task gradients become ``exp(s_k) g_k`` and ``s`` gets the gradient
``exp(s_k) L_k - 1``. IMTL-G: the update ``sum_k alpha_k exp(s_k) g_k`` whose
projections on every task's unit gradient are equal, in closed form with task
0 as the reference. ``s`` lives in the state and takes a plain SGD step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax._checks import all_finite, check_float
from softadapt_jax.gradients.aggregators._core import Aggregator, check_jacobian, check_losses

NAME = "imtl"


class IMTLState(NamedTuple):
    """The state of :func:`imtl`.

    Attributes:
      loss_scale: ``[K]`` the log-scales ``s`` (LibMTL's ``loss_scale`` parameter, starts at 0).
      loss_scale_grad: ``[K]`` the gradient ``exp(s_k) L_k - 1`` of the last step (before it was applied).
    """

    loss_scale: jax.Array
    loss_scale_grad: jax.Array


def _lu_solve(m: jax.Array, b: jax.Array) -> jax.Array:
    # Partial-pivoting LU and two triangular solves: what jnp.linalg.solve does, without its
    # custom_linear_solve wrapper, which costs far more to compile for these tiny systems.
    # NaN where m is singular to working precision: a pivot within (size * eps) of the
    # largest entry is rounding noise (exactly 0 where LibMTL's inverse raises).
    lu, _, perm = jax.lax.linalg.lu(m)
    y = jax.lax.linalg.triangular_solve(lu, b[perm][:, None], left_side=True, lower=True, unit_diagonal=True)
    x = jax.lax.linalg.triangular_solve(lu, y, left_side=True, lower=False)[:, 0]
    tiny = m.shape[0] * jnp.finfo(m.dtype).eps * jnp.max(jnp.abs(m))
    return jnp.where(jnp.min(jnp.abs(jnp.diagonal(lu))) > tiny, x, jnp.nan)


def imtl_weights(jacobian: jax.Array) -> jax.Array:
    """LibMTL's closed-form IMTL-G coefficients ``alpha [K]`` of the gradients ``jacobian [K, n]``.

    With unit gradients ``u_k = g_k / ||g_k||``, ``D = g_0 - g_{1:}`` and
    ``U = u_0 - u_{1:}`` (rows ``1..K-1``), ``alpha_{1:} = g_0 U^T (D U^T)^{-1}``
    and ``alpha_0 = 1 - sum(alpha_{1:})``; then ``d = alpha^T J`` has the same
    projection on every ``u_k``. ``K = 1`` gives ``alpha = [1]``.

    Returns:
      ``[K]``; NaN where the closed form is undefined: a zero gradient (LibMTL
      gives NaN), or ``D U^T`` singular to working precision, i.e. a pivot of
      its LU factorisation within ``(K-1) eps max|D U^T|`` (duplicate or
      dependent gradients, K > n + 1; LibMTL raises
      ``LinAlgError`` where the pivot is exactly 0 and returns rounding noise
      otherwise).
    """
    k = jacobian.shape[0]
    if k == 1:
        return jnp.ones((1,), jacobian.dtype)
    hp = jax.lax.Precision.HIGHEST
    units = jacobian / jnp.linalg.norm(jacobian, axis=-1, keepdims=True)
    d = jacobian[0] - jacobian[1:]
    u = units[0] - units[1:]
    m = jnp.matmul(d, u.T, precision=hp)
    b = jnp.matmul(u, jacobian[0], precision=hp)
    # alpha_{1:} M = b  <=>  M^T alpha_{1:} = b: a solve instead of LibMTL's explicit inverse.
    rest = _lu_solve(m.T, b)
    return jnp.concatenate([1.0 - jnp.sum(rest, keepdims=True), rest])


def imtl_loss_scale_grad(loss_scale: jax.Array, losses: jax.Array) -> jax.Array:
    """``d/ds_k (exp(s_k) L_k - s_k) = exp(s_k) L_k - 1``, the IMTL-L gradient of the log-scales."""
    return jnp.exp(loss_scale) * losses - 1.0


def imtl(*, loss_scale_lr: float = 0.1) -> Aggregator:
    """IMTL (hybrid): ``d = sum_k alpha_k exp(s_k) g_k``, ``alpha = imtl_weights(exp(s) * J)``.

    Paper: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.
    Original implementation reproduced: LibMTL, ``LibMTL/weighting/IMTL.py``
    (git 4336804), ``rep_grad=False``. For the pure IMTL-G Gramian weighting
    (torchjd's IMTLG) see ``imtl_g``.

    Each ``update`` computes the direction at the current scales ``s``, then
    steps them: ``s <- s - loss_scale_lr * (exp(s) L - 1)``. LibMTL leaves
    that step to the Trainer's optimiser (Adam, lr 1e-4 by default); the
    default ``loss_scale_lr=0.1`` is plain SGD at the rate of the reference
    harness, which stepped ``loss_scale`` with ``torch.optim.SGD(lr=0.1)``.
    With ``loss_scale_lr=0`` the scales stay at their initial value and
    ``state.loss_scale_grad`` still reports their gradient, for an external
    optimiser.

    Args:
      loss_scale_lr: the SGD learning rate of the log-scales, >= 0.

    Returns:
      A stateful :class:`Aggregator` (state :class:`IMTLState`) that needs ``losses``.

    Degenerate and non-finite data: where the closed form is undefined (see
    :func:`imtl_weights`: a zero gradient, where LibMTL gives NaN; ``D U^T``
    singular to working precision, where LibMTL raises ``LinAlgError`` or
    returns rounding noise), the coefficients fall back to ``alpha = 1/K``:
    the update is the mean of the scaled gradients, and the scales still
    step. A step whose Jacobian or losses are not finite is skipped: zero
    update, state unchanged.
    """
    loss_scale_lr = check_float(loss_scale_lr, "loss_scale_lr", low=0.0)

    def init(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> IMTLState:
        del dim
        # One buffer per field, so that a step may donate the state.
        return IMTLState(
            loss_scale=jnp.zeros((num_tasks,), dtype), loss_scale_grad=jnp.zeros((num_tasks,), dtype)
        )

    def update(
        jacobian: Any, state: IMTLState, *, losses: Any = None, key: Any = None
    ) -> tuple[jax.Array, Any]:
        del key
        j = check_jacobian(jacobian)
        k = j.shape[0]
        losses_ = check_losses(losses, k, NAME).astype(j.dtype)
        if state.loss_scale.shape != (k,):
            raise ValueError(
                f"`jacobian` has K={k} tasks but the state's loss_scale has shape "
                f"{tuple(state.loss_scale.shape)}: init the state with the same K."
            )
        s = state.loss_scale.astype(j.dtype)
        scaled = jnp.exp(s)[:, None] * j
        alpha = imtl_weights(scaled)
        alpha = jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, jnp.full_like(alpha, 1.0 / k))
        d = jnp.matmul(alpha, scaled, precision=jax.lax.Precision.HIGHEST)
        grad = imtl_loss_scale_grad(s, losses_)
        new = IMTLState(
            loss_scale=(s - loss_scale_lr * grad).astype(state.loss_scale.dtype),
            loss_scale_grad=grad.astype(state.loss_scale_grad.dtype),
        )
        ok = all_finite(j, losses_, d, new)
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        return jnp.where(ok, d, jnp.zeros_like(d)), new

    return Aggregator(name=NAME, init=init, update=update, stateful=True, needs_losses=True)


AGGREGATORS = {NAME: imtl}
