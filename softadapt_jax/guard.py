"""The step-level guard: a step whose losses or gradients are not finite changes nothing.

A balancer already refuses non-finite losses, but a train step also applies a
gradient, and one nan gradient makes every parameter nan for good. The train
steps of :mod:`softadapt_jax.flax.train_step`, :mod:`softadapt_jax.flax.nnx`,
RotoGrad and GradNorm compute the whole new state, then keep the old one
wherever :func:`all_finite` is false (a select, so the step stays one compiled
program), and count the skipped step in every balancer state.

For a step written by hand with plain optax, wrap the optimizer instead::

    tx = sj.guard.apply_if_finite(optax.chain(sj.softadapt(...), optax.adam(1e-3)))

It must be the *outermost* transform, so that the balancer's state is kept
too, and it sees the gradients only: a nan loss with a finite gradient still
reaches the balancer, which rejects it and counts it. :func:`apply_if_finite`
is ``optax.apply_if_finite`` except for the shape of a skipped step's
updates, which makes it work around transforms that change the updates'
shape (``per_component=True``: stacked ``[K, ...]`` in, parameter-shaped
out); ``optax.apply_if_finite`` does the same for every other chain.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softadapt_jax._checks import all_finite
from softadapt_jax.balancers.base import BalancerState

__all__ = ["all_finite", "apply_if_finite", "count_skipped", "guard_step", "keep_if", "step_metrics"]


def apply_if_finite(
    inner: optax.GradientTransformation, max_consecutive_errors: int = int(np.iinfo(np.int32).max)
) -> optax.GradientTransformationExtraArgs:
    """``optax.apply_if_finite`` that also wraps transforms which change the updates' shape.

    A step whose incoming updates are not all finite is skipped: the inner
    state is kept and the returned updates are zeros shaped like the inner
    transform's *output* (optax returns zeros shaped like its input, which
    cannot trace around ``balance(..., per_component=True)``: stacked
    ``[K, ...]`` gradients in, parameter-shaped updates out). The output shape
    comes from abstract evaluation, so the skip costs no computation. The state
    and its counters are optax's ``ApplyIfFiniteState``.

    Args:
      inner: the transform to protect (a whole chain, balancer included).
      max_consecutive_errors: past this many consecutive non-finite steps the
        update is applied anyway, as in optax; the default never gives up.

    Returns:
      A ``GradientTransformationExtraArgs`` (extra arguments such as
      ``losses=`` pass through to ``inner``).
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        finite = all_finite(updates)
        count = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))

        def apply(_: None) -> tuple[Any, Any]:
            return inner.update(updates, state.inner_state, params, **extra_args)

        def skip(_: None) -> tuple[Any, Any]:
            out = jax.eval_shape(apply, None)[0]
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out), state.inner_state

        new_updates, inner_state = jax.lax.cond(finite | (count > max_consecutive_errors), apply, skip, None)
        total = jnp.where(finite, state.total_notfinite, optax.safe_increment(state.total_notfinite))
        return new_updates, optax.ApplyIfFiniteState(
            notfinite_count=count, last_finite=finite, total_notfinite=total, inner_state=inner_state
        )

    return optax.GradientTransformationExtraArgs(
        optax.apply_if_finite(inner, max_consecutive_errors).init, update_fn
    )


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
