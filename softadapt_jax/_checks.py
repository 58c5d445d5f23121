"""Trace-time argument checks shared by the public functions.

Every check runs on static information (shapes, dtypes, Python values), so it
fails while JAX traces a function, before anything is compiled, with a message
that names the argument and what was received.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_float_array(x: Any, name: str) -> jax.Array:
    """Converts ``x`` to a floating JAX array; integers are promoted.

    Half-precision inputs are promoted to float32: slopes of low-precision
    losses lose all their digits otherwise.

    Raises:
      TypeError: if ``x`` is boolean, complex or not numeric.
    """
    try:
        arr = jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a numeric array, got {type(x).__name__}: {err}") from None
    dtype = arr.dtype
    if dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.complexfloating) or not (
        jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    ):
        raise TypeError(
            f"`{name}` must hold real numbers (float or integer), got dtype {dtype} "
            f"with shape {tuple(arr.shape)}."
        )
    if jnp.issubdtype(dtype, jnp.integer):
        return arr.astype(jnp.result_type(float))
    if jnp.finfo(dtype).bits < 32:
        return arr.astype(jnp.float32)
    return arr


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Returns ``value`` as an int, or raises if it is not an integer >= minimum."""
    if isinstance(value, jax.Array):
        raise TypeError(
            f"`{name}` is static configuration and must be a Python int, got an array {value!r}. "
            "Under optax.inject_hyperparams, list it in static_args (e.g. "
            "softadapt_jax.SOFTADAPT_STATIC_ARGS)."
        )
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"`{name}` must be an integer >= {minimum}, got {value!r} of type {type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value}.")
    return int(value)


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """Returns ``value`` if it is one of ``choices``, else raises ValueError."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {value!r}.")
    return value


def check_scalar(x: Any, name: str) -> jax.Array:
    """Converts ``x`` to a scalar float array (traced values allowed)."""
    arr = as_float_array(x, name)
    if arr.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {tuple(arr.shape)}.")
    return arr


def check_unknown_options(options: dict[str, Any], known: Collection[str], where: str) -> None:
    """Raises ValueError naming any option of ``options`` not in ``known``."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{where} got unknown option(s) {unknown}; known options are {sorted(known)}.")
