"""Any Jacobian aggregator as an optax transform over stacked per-component gradients.

Gramian weightings take the Gramian route: the update is ``w(G) @ J`` with
``G`` formed leaf by leaf from the gradients scaled by a power of two,
``2**-e`` (``per_component.scaled_gram_of_leaves``), and ``J`` never
flattened. ``e = 0`` unless the largest shared entry reaches ``2**32`` or is
below ``2**-33`` (float32; ``2**256`` and ``2**-257`` in float64), and a power
of two changes no rounding, so in that range this is the plain computation,
bit for bit. Outside it the weighting sees the gradients scaled to just inside
it: its scale-invariant parts are unaffected, and its absolute constants
(LibMTL's 1e-8 guards and MGDA step thresholds, torchjd's trace thresholds)
act on that scale. So the update is finite for finite gradients wherever it
is representable; components whose norm is below about ``2**-94`` times the
largest entry (in float32) then count as zero gradients.

A weighting of a method that reads the losses or draws random numbers takes
them as keywords, ``weighting(G, losses=...)`` and ``weighting(G, key=...)``;
one whose direction does not scale with the gradients (MGDA's ``w_k /
||g_k||``) is wrapped in :class:`ScaleFreeWeighting`, so that the power of two
is not multiplied back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
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


@dataclasses.dataclass(frozen=True)
class ScaleFreeWeighting:
    """A Gramian weighting whose direction does not change with a common scale of the gradients.

    Its weights scale as ``1 / |g|`` (``w(s^2 G) = w(G) / s``), so weights from
    the Gramian of the gradients scaled by ``2**-e`` applied to those scaled
    gradients already give the update; :func:`aggregate` then skips the
    multiplication by ``2**e``.

    Attributes:
      weighting: ``gramian [K, K] -> weights [K]`` (with the method's keywords).
    """

    weighting: Callable[..., jax.Array]

    def __call__(self, gramian: jax.Array, **kwargs: Any) -> jax.Array:
        """The weights of ``gramian``."""
        return self.weighting(gramian, **kwargs)


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
    of the gradients scaled by a power of two (module docstring).

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
        if not agg.stateful:  # nothing sized by the parameters (so `init(None)` works, as optax's)
            return AggregateState(method=(), key=jax.random.PRNGKey(seed))
        leaves = jax.tree.leaves(params)
        if mask is not None:
            # The Jacobian's columns are the shared (masked-in) entries only.
            flags = jax.tree.structure(params).flatten_up_to(resolve_mask(mask, params))
            leaves = [p for p, f in zip(leaves, flags, strict=True) if f]
        dim = sum(int(jnp.size(p)) for p in leaves)
        dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        return AggregateState(method=agg.init(num_tasks, dim, dtype), key=jax.random.PRNGKey(seed))

    def update_fn(
        updates: Any, state: AggregateState, params: Any = None, *, losses: Any = None, **extra: Any
    ) -> tuple[Any, AggregateState]:
        del extra
        if axis_name is not None:
            updates = jax.lax.pmean(updates, axis_name)
        shared, rebuild, k = split_stacked(updates, mask=mask, params=params)
        if agg.needs_losses:
            if losses is None:
                raise ValueError(
                    f"the transform of aggregator {agg.name!r} needs the current component losses at "
                    f"every step; it reads the current losses: pass `losses=` of shape ({k},) to "
                    "`update(updates, state, params, losses=losses)`."
                )
            losses = jax.lax.stop_gradient(check_losses(losses, k, agg.name))
            if axis_name is not None:
                losses = jax.lax.pmean(losses, axis_name)
        else:
            losses = None
        key, sub = jax.random.split(state.key) if agg.needs_key else (state.key, None)
        if agg.weighting is not None and not agg.stateful:
            extra = {"losses": losses} if agg.needs_losses else {}
            if agg.needs_key:
                extra["key"] = sub
            gram, exponent = scaled_gram_of_leaves(shared)
            weights = agg.weighting(gram, **extra)
            rescale = not isinstance(agg.weighting, ScaleFreeWeighting)
            combined = combine_leaves(weights, shared, exponent=exponent, rescale=rescale)
            return rebuild(combined), state._replace(key=key)
        jac = jnp.concatenate([g.reshape(k, -1) for g in shared], axis=1)
        direction, method = agg.update(jac, state.method, losses=losses, key=sub)
        pieces, start = [], 0
        for g in shared:
            size = int(g[0].size)
            pieces.append(direction[start : start + size].reshape(g.shape[1:]).astype(g.dtype))
            start += size
        return rebuild(pieces), AggregateState(method=method, key=key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
