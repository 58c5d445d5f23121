"""Trace-time argument checks shared by the public functions.

Every check runs on static information (shapes, dtypes, Python values), so it
fails while JAX traces a function, before anything is compiled, with a message
that names the argument and what was received.
"""

from __future__ import annotations

import functools
import math
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
    if (
        dtype == jnp.bool_
        or jnp.issubdtype(dtype, jnp.complexfloating)
        or not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
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


def check_vector(x: Any, name: str, k: int) -> jax.Array:
    """``x`` as a float array of shape ``(k,)``, or a ValueError naming ``name`` and the shape got."""
    arr = as_float_array(x, name)
    if arr.shape != (k,):
        raise ValueError(f"`{name}` must have shape ({k},), got {tuple(arr.shape)}.")
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


def check_float(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Returns a finite real hyperparameter as a Python float, or raises.

    Raises:
      TypeError: ``value`` is not a real number (bools and traced values included).
      ValueError: ``value`` is not finite or outside the interval, with the
        interval and the value in the message.
    """
    if (
        isinstance(value, (jax.Array, np.ndarray))
        and value.ndim == 0
        and not isinstance(value, jax.core.Tracer)
    ):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a real number, got {value!r} of type {type(value).__name__}.")
    v = float(value)
    ok = math.isfinite(v)
    if low is not None:
        ok = ok and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        if low is not None and high is not None:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            interval = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            interval = f"{'<' if high_open else '<='} {high:g}"
        else:
            interval = ""
        bound = f" {interval}" if interval else ""
        raise ValueError(f"`{name}` must be a finite number{bound}, got {value!r}.")
    return v


def all_finite(*trees: Any) -> jax.Array:
    """Whether every floating leaf of every tree is finite (a scalar bool array; True for none)."""
    # One reduction per dtype over the concatenated leaves rather than one per leaf: XLA fuses the
    # concatenation into the reduction, so a model of many small leaves pays for one kernel, not
    # for a kernel (and its launch) per leaf. Grouping by dtype avoids up-casting copies.
    by_dtype: dict[Any, list[jax.Array]] = {}
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            x = jnp.asarray(leaf)
            if jnp.issubdtype(x.dtype, jnp.inexact):
                by_dtype.setdefault(x.dtype, []).append(jnp.ravel(x))
    checks = [jnp.all(jnp.isfinite(jnp.concatenate(xs))) for xs in by_dtype.values()]
    return functools.reduce(jnp.logical_and, checks) if checks else jnp.asarray(True)


# jax.random.PRNGKey takes a seed that fits in 64 signed bits.
MAX_SEED = 2**63 - 1


def check_seed(value: Any, name: str = "seed") -> int:
    """A PRNG seed as a Python int in ``[0, 2**63 - 1]``, or a TypeError/ValueError naming ``name``."""
    seed = check_positive_int(value, name, minimum=0)
    if seed > MAX_SEED:
        raise ValueError(f"`{name}` must be an integer in [0, 2**63 - 1], got {seed}.")
    return seed
