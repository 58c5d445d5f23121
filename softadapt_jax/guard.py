"""The step-level guard: a step whose losses or gradients are not finite changes nothing.

A balancer already refuses non-finite losses, but a train step also applies a
gradient, and one nan gradient makes every parameter nan for good. The train
steps of :mod:`softadapt_jax.training`, :mod:`softadapt_jax.nnx_training`,
RotoGrad and GradNorm compute the whole new state, then keep the old one
wherever :func:`all_finite` is false (a select, so the step stays one compiled
program), and count the skipped step in every balancer state.

For a step written by hand with plain optax, wrap the optimizer instead::

    tx = optax.apply_if_finite(optax.chain(sj.softadapt(...), optax.adam(1e-3)), max_consecutive_errors=10**9)

``apply_if_finite`` must be the *outermost* transform, so that the balancer's
state is kept too, and it sees the gradients only: a nan loss with a finite
gradient still reaches the balancer, which rejects it and counts it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax._checks import all_finite
from softadapt_jax.balancers.base import BalancerState

__all__ = ["all_finite", "count_skipped", "guard_step", "keep_if", "step_metrics"]


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok``, else ``old``, leaf by leaf (both trees of the same structure)."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def count_skipped(opt_state: Any) -> Any:
    """``opt_state`` with the ``rejected`` count of every balancer state in it raised by one."""

    def bump(node: Any) -> Any:
        if isinstance(node, BalancerState):
            return node._replace(rejected=node.rejected + 1)
        return node

    return jax.tree.map(bump, opt_state, is_leaf=lambda x: isinstance(x, BalancerState))


def guard_step(ok: jax.Array, new_opt_state: Any, old_opt_state: Any) -> Any:
    """The optimizer state after a guarded step: the new one if ``ok``, else the old one, counted."""
    return keep_if(ok, new_opt_state, count_skipped(old_opt_state))


def step_metrics(
    losses: jax.Array, weights: jax.Array, total: jax.Array, ok: jax.Array, aux: Any = None, *, has_aux: bool
) -> dict[str, Any]:
    """The metrics every train step returns: losses, weights, weighted and plain sums, skipped (and aux)."""
    metrics = {
        "losses": losses,
        "weights": weights,
        "total": total,
        "loss": jnp.sum(losses),
        "skipped": jnp.logical_not(ok),
    }
    if has_aux:
        metrics["aux"] = aux
    return metrics
