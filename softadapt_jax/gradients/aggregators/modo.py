"""MoDo (multi-objective gradient with double sampling), LibMTL's form.

Each step reads the gradients of THREE independent batches, ``J [3, K, n]``:
the task weights take a projected step on ``J_0 J_1^T lambda`` (two batches,
so the product is an unbiased estimate of the Gramian's action) and the update
combines the third batch's gradients with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax._checks import all_finite, as_float_array, check_float
from softadapt_jax.gradients.aggregators._common import check_state_shape, stateful_aggregator
from softadapt_jax.gradients.aggregators._core import Aggregator
from softadapt_jax.gradients.aggregators._simplex import (
    libmtl_simplex_projection as _libmtl_simplex_projection,
)

NAME = "modo"


class MoDoState(NamedTuple):
    """The state of :func:`modo`.

    Attributes:
      lambd: ``[K]`` the task weights on the simplex (start at 1/K).
    """

    lambd: jax.Array


def check_three_batches(jacobian: Any, losses: Any, agg_name: str) -> tuple[jax.Array, jax.Array | None]:
    """``jacobian`` as ``[3, K, n]`` and ``losses`` (optional) as ``[3, K]``, or a ValueError.

    MoDo and SDMGrad read the gradients of three independently sampled batches
    per step, stacked on a leading axis of size 3.
    """
    j = as_float_array(jacobian, "jacobian")
    if j.ndim != 3 or j.shape[0] != 3 or j.shape[1] < 1:
        raise ValueError(
            f"aggregator {agg_name!r} reads the gradients of three batches: `jacobian` must have shape "
            f"[3, K, n] (batch, task, parameter) with K >= 1, got {tuple(j.shape)}."
        )
    if losses is None:
        return j, None
    lo = as_float_array(losses, "losses")
    if lo.shape != j.shape[:2]:
        raise ValueError(
            f"`losses` must have shape {tuple(j.shape[:2])} (three batches of K losses) to match the "
            f"jacobian, got {tuple(lo.shape)}."
        )
    return j, lo


def _three_batch_aggregator(
    name: str, state_cls: Any, advance_weights: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
) -> Aggregator:
    """The aggregator of a method that reads three batches and iterates task weights (MoDo, SDMGrad).

    Args:
      name: the registry name.
      state_cls: the method's state, a NamedTuple of one field: ``[K]`` task
        weights on the simplex, starting at 1/K.
      advance_weights: ``(J [3, K, n], weights [K]) -> (direction [n], new weights [K])``,
        in the Jacobian's dtype.

    Returns:
      A stateful :class:`Aggregator`; ``losses`` ``[3, K]`` are validated but
      not read, and a step whose Jacobian or result is not finite is skipped.
    """
    (field,) = state_cls._fields

    def init(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> Any:
        del dim
        return state_cls(jnp.full((num_tasks,), 1.0 / num_tasks, dtype))

    def advance(j: jax.Array, losses: Any, state: Any) -> tuple[jax.Array, Any, jax.Array]:
        del losses
        (weights,) = state
        check_state_shape(field, weights.shape, (j.shape[1],))
        d, new_weights = advance_weights(j, weights.astype(j.dtype))
        new = state_cls(new_weights.astype(weights.dtype))
        return d, new, all_finite(j, d, new)

    return stateful_aggregator(name, init, advance, read=check_three_batches, needs_losses=False)


def modo_lambda_step(
    jacobians: jax.Array, lambd: jax.Array, *, gamma: float = 1e-3, rho: float = 0.1
) -> jax.Array:
    """``proj_simplex(lambda - gamma (J_0 (J_1^T lambda) + rho lambda))`` with LibMTL's projection.

    Args:
      jacobians: ``[3, K, n]``; batches 0 and 1 are read.
      lambd: ``[K]`` the current weights.
      gamma: the step size (LibMTL's ``MoDo_gamma``).
      rho: the l2 regularisation (LibMTL's ``MoDo_rho``).
    """
    if lambd.shape[0] == 1:  # the simplex is a single point
        return jnp.ones_like(lambd)
    hp = jax.lax.Precision.HIGHEST
    action = jnp.matmul(jacobians[0], jnp.matmul(lambd, jacobians[1], precision=hp), precision=hp)
    return _libmtl_simplex_projection(lambd - gamma * (action + rho * lambd))


def modo(*, gamma: float = 1e-3, rho: float = 0.1) -> Aggregator:
    """MoDo: ``lambda`` from :func:`modo_lambda_step`, update ``d = lambda^T J_2``.

    Paper: Chen et al., "Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023.
    Original implementation reproduced: LibMTL, ``LibMTL/weighting/MoDo.py``
    (git 4336804), ``rep_grad=False`` (LibMTL also divides the task heads'
    gradients by 3, which concerns no shared parameter).

    Interface: ``update(J, state)`` with ``J [3, K, n]``, the Jacobians of
    three independently sampled batches (LibMTL's Trainer samples three for
    MoDo); ``losses`` ``[3, K]`` may be passed and is validated, but MoDo does
    not read it. ``init(K, n, dtype)`` as usual. The optax adapter, which
    stacks one Jacobian per step, does not serve this method.

    Args:
      gamma: the step size of ``lambda`` (LibMTL's ``MoDo_gamma``, default 1e-3).
      rho: its l2 regularisation (LibMTL's ``MoDo_rho``, default 0.1).

    Returns:
      A stateful :class:`Aggregator` (state :class:`MoDoState`); LibMTL's
      returned weights are ``state.lambd``.

    Non-finite data: a step whose Jacobian or result is not finite is skipped:
    zero update, state unchanged.
    """
    gamma = check_float(gamma, "gamma")
    rho = check_float(rho, "rho")

    def advance_weights(j: jax.Array, lambd: jax.Array) -> tuple[jax.Array, jax.Array]:
        lambd = modo_lambda_step(j, lambd, gamma=gamma, rho=rho)
        return jnp.matmul(lambd, j[2], precision=jax.lax.Precision.HIGHEST), lambd

    return _three_batch_aggregator(NAME, MoDoState, advance_weights)


AGGREGATORS = {NAME: modo}
