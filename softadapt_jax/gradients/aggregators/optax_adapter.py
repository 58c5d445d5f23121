"""Any Jacobian aggregator as an optax transform over stacked per-component gradients."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from softadapt_jax._checks import check_positive_int, check_seed
from softadapt_jax.gradients.aggregators._core import Aggregator, check_losses
from softadapt_jax.gradients.per_component import (
    Mask,
    combine_leaves,
    resolve_mask,
    scaled_gram_of_leaves,
    split_stacked,
)


class AggregateState(NamedTuple):
    """State of :func:`aggregate`."""

    method: Any  # the aggregator's own state (``()`` when stateless)
    key: jax.Array  # PRNG key, split at every step by methods that draw (uint32 [2] or a typed key)


def aggregate(
    agg: Aggregator,
    *,
    num_tasks: int | None = None,
    mask: Mask = None,
    axis_name: Hashable | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """The optax transform ``stacked gradients [K, ...] -> agg(J)``, shaped like the parameters.

    ``updates`` are per-component gradients stacked on a leading axis K (the
    output of :func:`~softadapt_jax.gradients.per_component_grads`). The
    masked-in leaves, flattened and concatenated, are the rows of the Jacobian
    ``J [K, n]``; the aggregator's direction is cut back into those leaves, and
    masked-out (task-specific) leaves get the plain sum over K. Gramian
    weightings never form ``J``: their weights come from the ``K x K`` Gramian
    of the gradients scaled by a power of two, as the library's other
    gradient combiners.

    Args:
      agg: an :class:`Aggregator` (from :func:`aggregator`).
      num_tasks: K; required by stateful aggregators, whose state is sized at
        ``init`` (which only sees the parameters).
      mask: optax-style mask of the shared leaves (``None``: all).
      axis_name: under ``jax.pmap``, the per-device stacked gradients (and
        losses) are averaged over this axis first, so every replica
        aggregates the Jacobian of the global batch.
      seed: seed of the key that random aggregators split at every step.

    Returns:
      A ``GradientTransformationExtraArgs``; ``update(updates, state, params,
      *, losses=None)`` (``losses [K]`` for methods that read them).
    """
    if not isinstance(agg, Aggregator):
        raise TypeError(
            f"`agg` must be an Aggregator (from gradients.aggregator(name)), got {type(agg).__name__}."
        )
    if agg.stateful and num_tasks is None:
        raise ValueError(
            f"aggregator {agg.name!r} keeps state sized by K: pass `num_tasks=K` to `aggregate`."
        )
    if num_tasks is not None:
        check_positive_int(num_tasks, "num_tasks")
    seed = check_seed(seed)

    def init_fn(params: Any) -> AggregateState:
        leaves = jax.tree.leaves(params)
        if mask is not None:
            # The Jacobian's columns are the shared (masked-in) entries only.
            flags = jax.tree.structure(params).flatten_up_to(resolve_mask(mask, params))
            leaves = [p for p, f in zip(leaves, flags, strict=True) if f]
        dim = sum(int(jnp.size(p)) for p in leaves)
        dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        method = agg.init(num_tasks, dim, dtype) if agg.stateful else ()
        return AggregateState(method=method, key=jax.random.PRNGKey(seed))

    def update_fn(
        updates: Any, state: AggregateState, params: Any = None, *, losses: Any = None, **extra: Any
    ) -> tuple[Any, AggregateState]:
        del extra
        if axis_name is not None:
            updates = jax.lax.pmean(updates, axis_name)
        shared, rebuild, k = split_stacked(updates, mask=mask, params=params)
        if agg.needs_losses:
            losses = jax.lax.stop_gradient(check_losses(losses, k, agg.name))
            if axis_name is not None:
                losses = jax.lax.pmean(losses, axis_name)
        else:
            losses = None
        if agg.weighting is not None and not agg.stateful:
            gram, exponent = scaled_gram_of_leaves(shared)
            return rebuild(combine_leaves(agg.weighting(gram), shared, exponent=exponent)), state
        key, sub = jax.random.split(state.key) if agg.needs_key else (state.key, None)
        jac = jnp.concatenate([g.reshape(k, -1) for g in shared], axis=1)
        direction, method = agg.update(jac, state.method, losses=losses, key=sub)
        pieces, start = [], 0
        for g in shared:
            size = int(g[0].size)
            pieces.append(direction[start : start + size].reshape(g.shape[1:]).astype(g.dtype))
            start += size
        return rebuild(pieces), AggregateState(method=method, key=key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
