"""Small pieces shared by several aggregators: option and argument checks, the skip of a non-finite step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax.gradients.aggregators._core import Aggregator, check_jacobian, check_losses


def static_floats(value: Any, name: str, expected: str) -> np.ndarray | None:
    """A static option as a float64 NumPy array (``None`` stays ``None``); a TypeError if not numeric."""
    if value is None:
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be {expected}, got {value!r}: {err}") from None


def jacobian_and_losses(jacobian: Any, losses: Any, agg_name: str) -> tuple[jax.Array, jax.Array]:
    """``(J [K, n], losses [K])`` checked, the losses cast to the Jacobian's dtype."""
    j = check_jacobian(jacobian)
    return j, check_losses(losses, j.shape[0], agg_name).astype(j.dtype)


def check_state_shape(field: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    """A ValueError unless the state's ``field`` has the shape ``want`` the Jacobian implies.

    ``want`` is ``(K, n)`` for a per-parameter buffer or ``(K,)`` for task weights.
    """
    got, want = tuple(got), tuple(want)
    if got != want:
        same = "(K, n)" if len(want) == 2 else "K"
        raise ValueError(
            f"the jacobian implies shape {want} for the state's {field}, but it has shape {got}: "
            f"init the state with the same {same}."
        )


def commit_if(ok: jax.Array, direction: jax.Array, new_state: Any, state: Any) -> tuple[jax.Array, Any]:
    """``(direction, new_state)`` if ``ok``, else ``(0, state)``: a skipped step leaves no trace."""
    kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, state)
    return jnp.where(ok, direction, jnp.zeros_like(direction)), kept


def stateful_aggregator(
    name: str,
    init: Callable[..., Any],
    advance: Callable[[jax.Array, Any, Any], tuple[jax.Array, Any, jax.Array]],
    *,
    read: Callable[[Any, Any, str], tuple[jax.Array, Any]] = jacobian_and_losses,
    needs_losses: bool = True,
) -> Aggregator:
    """A stateful, deterministic aggregator from its pure step; :func:`commit_if` skips a failed step.

    Args:
      name: the registry name (also the one the input checks report).
      init: ``(num_tasks, dim, dtype) -> state``.
      advance: ``(jacobian, losses, state) -> (direction, new_state, ok)`` on
        the checked inputs; ``ok`` (a scalar bool) is False where the step must
        leave no trace (its data or its result not finite).
      read: ``(jacobian, losses, name) -> (jacobian, losses)``, the input
        checks; default :func:`jacobian_and_losses` (``J [K, n]``, ``losses [K]``).
      needs_losses: whether ``update`` requires ``losses``.

    Returns:
      An :class:`~softadapt_jax.gradients.aggregators._core.Aggregator` whose
      ``update(jacobian, state, *, losses=None, key=None)`` ignores ``key``.
    """

    def update(jacobian: Any, state: Any, *, losses: Any = None, key: Any = None) -> tuple[jax.Array, Any]:
        del key
        j, losses_ = read(jacobian, losses, name)
        direction, new_state, ok = advance(j, losses_, state)
        return commit_if(ok, direction, new_state, state)

    return Aggregator(name=name, init=init, update=update, stateful=True, needs_losses=needs_losses)
