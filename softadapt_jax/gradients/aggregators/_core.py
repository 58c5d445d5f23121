"""The Jacobian-aggregator type shared by every method of :mod:`softadapt_jax.gradients.aggregators`.

An aggregator maps the Jacobian ``J [K, n]`` of K losses (row k is the
gradient of loss k over the n shared parameters) to one update ``d [n]``.
Configuration is closed over by the method's factory; what changes from call
to call is passed explicitly, so every aggregator is a pure function:

* ``init(num_tasks, dim, dtype) -> state`` (``()`` for stateless methods),
* ``update(jacobian, state, *, losses=None, key=None) -> (direction, state)``,

and where the method is a weighting of the Gramian ``G = J J^T`` (the update
is ``w(G) @ J``) also ``weighting(gramian) -> weights [K]``, which lets the
optax adapter work from the ``K x K`` Gramian without forming ``J``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax._checks import as_float_array, check_vector
from softadapt_jax.gradients.per_component import _row_major


@dataclasses.dataclass(frozen=True)
class Aggregator:
    """A Jacobian aggregator: static settings closed over, pure ``init``/``update``.

    A frozen dataclass (not a pytree), so ``jax.jit(agg)`` works as on a function.

    Attributes:
      name: the registry name (torchjd's class name in snake_case, or the
        method's name where torchjd has none).
      init: ``(num_tasks, dim, dtype) -> state``, a pytree of arrays
        (``()`` for stateless methods).
      update: ``(jacobian [K, n], state, *, losses=None, key=None) ->
        (direction [n], state)``.
      weighting: for Gramian weightings, ``gramian [K, K] -> weights [K]``
        with ``direction == weights @ jacobian``; else ``None``.
      stateful: whether ``update`` reads and advances ``state``.
      needs_key: whether ``update`` draws random numbers (then ``key`` is a
        ``jax.random`` key and is required).
      needs_losses: whether ``update`` reads the current losses ``[K]``.
    """

    name: str
    init: Callable[..., Any]
    update: Callable[..., tuple[jax.Array, Any]]
    weighting: Callable[[jax.Array], jax.Array] | None = None
    stateful: bool = False
    needs_key: bool = False
    needs_losses: bool = False

    def __call__(self, jacobian: Any, *, losses: Any = None, key: Any = None) -> jax.Array:
        """The update of a stateless aggregator: ``direction [n]`` for ``jacobian [K, n]``."""
        if self.stateful:
            raise TypeError(
                f"aggregator {self.name!r} keeps state between calls: use "
                "`state = agg.init(K, n, dtype)` and `direction, state = agg.update(jacobian, state)`."
            )
        direction, _ = self.update(jacobian, (), losses=losses, key=key)
        return direction


def no_state(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> tuple[()]:
    """``init`` of a stateless aggregator."""
    del num_tasks, dim, dtype
    return ()


def check_jacobian(jacobian: Any, name: str = "jacobian") -> jax.Array:
    """``jacobian`` as a float array ``[K, n]`` with ``K >= 1``, or a ValueError naming it."""
    arr = as_float_array(jacobian, name)
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"`{name}` must be a matrix [K, n] with K >= 1 rows, got shape {tuple(arr.shape)}.")
    return arr


def check_key(key: Any, agg_name: str) -> jax.Array:
    """``key`` if it is a PRNG key, else a ValueError saying that ``agg_name`` draws random numbers."""
    if key is None:
        raise ValueError(
            f"aggregator {agg_name!r} draws random numbers: pass `key=jax.random.key(seed)` "
            "(or a split of it)."
        )
    return key


def check_losses(losses: Any, k: int, agg_name: str) -> jax.Array:
    """``losses`` as a float vector ``[k]``, or a ValueError saying that ``agg_name`` needs them."""
    if losses is None:
        raise ValueError(f"aggregator {agg_name!r} reads the current losses: pass `losses=` of shape ({k},).")
    return check_vector(losses, "losses", k)


def gramian_of(jacobian: jax.Array) -> jax.Array:
    """``J J^T`` at full precision (the solvers need every digit; TPUs default to bf16 passes)."""
    return _row_major(jnp.matmul(jacobian, jacobian.T, precision=jax.lax.Precision.HIGHEST))


def combine_rows(weights: jax.Array, jacobian: jax.Array) -> jax.Array:
    """``weights @ jacobian`` (``[K] @ [K, n] -> [n]``) at full precision, in the Jacobian's dtype."""
    # The barrier keeps the weights a vector: XLA would otherwise fold the [K, 1] shape of the
    # solve that made them into this product, which the CPU backend then runs as a transposed
    # matrix product, several times slower for small K.
    w = jax.lax.optimization_barrier(weights.astype(jacobian.dtype))
    return jnp.matmul(w, jacobian, precision=jax.lax.Precision.HIGHEST)


def from_weighting(name: str, weighting: Callable[[jax.Array], jax.Array]) -> Aggregator:
    """A stateless aggregator ``J -> weighting(J J^T) @ J``.

    Args:
      name: the registry name.
      weighting: ``gramian [K, K] -> weights [K]``, pure and jittable.

    Returns:
      An :class:`Aggregator` whose ``weighting`` is ``weighting`` (the optax
      adapter's Gramian route uses it without forming ``J``).
    """

    def update(jacobian: Any, state: Any, *, losses: Any = None, key: Any = None) -> tuple[jax.Array, Any]:
        del losses, key
        j = check_jacobian(jacobian)
        w = weighting(gramian_of(j))
        return combine_rows(w, j), state

    return Aggregator(name=name, init=no_state, update=update, weighting=weighting)
