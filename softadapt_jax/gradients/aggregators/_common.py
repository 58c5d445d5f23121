"""Small pieces shared by several aggregators: option and argument checks, the skip of a non-finite step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax.gradients.aggregators._core import check_jacobian, check_losses


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
