"""FAMO (Fast Adaptive Multitask Optimization), LibMTL's form.

A loss-level method with learnable task logits ``w``: with ``z = softmax(w)``
and ``D_k = L_k + 1e-8``, the combined loss is ``sum_k z_k log(D_k) / c``,
``c = sum_k z_k / D_k`` held constant, so the update is
``sum_k z_k g_k / (c D_k)``. After the parameter step the logits take one Adam
step on the decrease of the log-losses: :func:`famo_update_weights`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax._checks import all_finite, as_float_array, check_float
from softadapt_jax.gradients.aggregators._common import commit_if, jacobian_and_losses
from softadapt_jax.gradients.aggregators._core import Aggregator

NAME = "famo"
_EPS = 1e-8  # LibMTL's shift inside log(L - min_losses + eps); min_losses is always 0 there
# torch.optim.Adam's defaults, which LibMTL's FAMO keeps.
_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8


class FAMOState(NamedTuple):
    """The state of :func:`famo`.

    Attributes:
      logits: ``[K]`` the task logits ``w`` (start at 0).
      prev_losses: ``[K]`` the losses of the last :func:`famo` update.
      adam_mu: ``[K]`` Adam's first moment of the logits.
      adam_nu: ``[K]`` Adam's second moment.
      adam_count: int32 scalar, the Adam steps taken.
      pending: bool scalar, whether an update ran since the last weight step
        (:func:`famo_update_weights` does nothing otherwise).
    """

    logits: jax.Array
    prev_losses: jax.Array
    adam_mu: jax.Array
    adam_nu: jax.Array
    adam_count: jax.Array
    pending: jax.Array


def famo_weights(logits: jax.Array, losses: jax.Array) -> jax.Array:
    """The update coefficients ``z_k / (c D_k)``.

    ``z = softmax(logits)``, ``D = L + 1e-8``, ``c = sum_k z_k / D_k``.
    """
    z = jax.nn.softmax(logits)
    d = losses + _EPS
    c = jnp.sum(z / d)
    return z / c / d


def famo_update_weights(
    state: FAMOState, losses_after: Any, *, w_lr: float = 0.025, w_gamma: float = 1e-3
) -> FAMOState:
    """FAMO's logit step, to call after the parameter step with the losses it produced.

    With ``delta_k = log(L_k^prev + 1e-8) - log(L_k^after + 1e-8)`` (the
    losses of the last update and ``losses_after``), the logits' gradient is
    ``J_softmax(w)^T delta = z * (delta - z . delta)``; one Adam step
    (torch's: L2 weight decay added to the gradient, betas 0.9/0.999, eps 1e-8)
    moves the logits. This is LibMTL's ``FAMO.update_w``, which its Trainer
    calls after ``optimizer.step()`` with the losses recomputed on the batch.

    Args:
      state: the state returned by the aggregator's ``update``.
      losses_after: ``[K]`` the losses after the parameter step.
      w_lr: Adam's learning rate (LibMTL's ``FAMO_w_lr``, default 0.025).
      w_gamma: Adam's weight decay (LibMTL's ``FAMO_w_gamma``, default 1e-3).

    Returns:
      The state with the new logits and Adam moments. Unchanged if no update
      ran since the last weight step, or if the step is not finite (a NaN/inf
      loss, or a loss <= -1e-8).
    """
    w_lr = check_float(w_lr, "w_lr", low=0.0)
    w_gamma = check_float(w_gamma, "w_gamma", low=0.0)
    after = as_float_array(losses_after, "losses_after")
    if after.shape != state.logits.shape:
        raise ValueError(
            f"`losses_after` must have shape {tuple(state.logits.shape)} like the state's logits, "
            f"got {tuple(after.shape)}."
        )
    w = state.logits
    after = after.astype(w.dtype)
    delta = jnp.log(state.prev_losses + _EPS) - jnp.log(after + _EPS)
    z = jax.nn.softmax(w)
    grad = z * (delta - jnp.dot(z, delta)) + w_gamma * w
    count = state.adam_count + 1
    mu = _ADAM_B1 * state.adam_mu + (1.0 - _ADAM_B1) * grad
    nu = _ADAM_B2 * state.adam_nu + (1.0 - _ADAM_B2) * grad * grad
    t = count.astype(w.dtype)
    bc1 = 1.0 - _ADAM_B1**t
    bc2_sqrt = jnp.sqrt(1.0 - _ADAM_B2**t)
    new_w = w - (w_lr / bc1) * mu / (jnp.sqrt(nu) / bc2_sqrt + _ADAM_EPS)
    new = FAMOState(
        logits=new_w,
        prev_losses=state.prev_losses,
        adam_mu=mu,
        adam_nu=nu,
        adam_count=count,
        pending=jnp.zeros((), bool),
    )
    ok = state.pending & all_finite(new)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)


def famo() -> Aggregator:
    """FAMO: the update ``sum_k z_k g_k / (c D_k)`` of :func:`famo_weights`, logits in the state.

    Paper: Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS
    2023. Original implementation reproduced: LibMTL,
    ``LibMTL/weighting/FAMO.py`` (git 4336804), ``min_losses = 0``.

    FAMO needs the losses *after* the parameter step for its weight update,
    which one ``update`` call cannot see. So the method is two pure functions:
    ``direction, state = agg.update(J, state, losses=L)`` (records ``L``), and
    after the parameter step ``state = famo_update_weights(state, L_after,
    w_lr=0.025, w_gamma=1e-3)`` (LibMTL's ``FAMO_w_lr``/``FAMO_w_gamma``
    defaults). Without the second call the logits stay at 0 and the update is
    the Mean-like ``sum_k g_k / (D_k sum_j 1/D_j)``.

    Returns:
      A stateful :class:`Aggregator` (state :class:`FAMOState`) that needs ``losses``.

    Non-finite data: a step whose Jacobian, losses or result are not finite
    (e.g. a loss <= -1e-8) is skipped: zero update, state unchanged.
    """

    def init(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> FAMOState:
        del dim
        # One buffer per field, so that a step may donate the state.
        return FAMOState(
            logits=jnp.zeros((num_tasks,), dtype),
            prev_losses=jnp.ones((num_tasks,), dtype),
            adam_mu=jnp.zeros((num_tasks,), dtype),
            adam_nu=jnp.zeros((num_tasks,), dtype),
            adam_count=jnp.zeros((), jnp.int32),
            pending=jnp.zeros((), bool),
        )

    def update(
        jacobian: Any, state: FAMOState, *, losses: Any = None, key: Any = None
    ) -> tuple[jax.Array, Any]:
        del key
        j, losses_ = jacobian_and_losses(jacobian, losses, NAME)
        c = famo_weights(state.logits.astype(j.dtype), losses_)
        d = jnp.matmul(c, j, precision=jax.lax.Precision.HIGHEST)
        new = state._replace(prev_losses=losses_.astype(state.prev_losses.dtype), pending=jnp.ones((), bool))
        ok = all_finite(j, losses_, d) & jnp.all(losses_ + _EPS > 0)
        return commit_if(ok, d, new, state)

    return Aggregator(name=NAME, init=init, update=update, stateful=True, needs_losses=True)


AGGREGATORS = {NAME: famo}
