"""Checkpoints of a whole train state, validated against the state they are restored into.

``flax.serialization`` writes msgpack bytes of the state (balancer included):
synchronous, dependency-free and exact, which is what a small state like this
needs (orbax is the choice for sharded multi-GB states and works on the same
pytree). Restoring checks the file against the target before anything is
replaced: same tree, and at every leaf the same shape and dtype. Without the
check a checkpoint of another K, window, balancer or model silently wins over
the target and training goes on with the wrong shapes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not match the state it is restored into."""


def save_checkpoint(path: str | os.PathLike[str], state: Any) -> None:
    """Writes ``state`` (train state, balancer included) as msgpack bytes.

    The file is written to a temporary name and renamed, so a crash never
    leaves a half-written checkpoint.
    """
    data = flax.serialization.to_bytes(jax.device_get(state))
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def restore_checkpoint(path: str | os.PathLike[str], target: Any) -> Any:
    """Reads a checkpoint written by :func:`save_checkpoint` into the structure of ``target``.

    Args:
      path: the file.
      target: a state of the structure to restore (e.g. a freshly created
        train state with the same model, optimizer and balancer).

    Returns:
      ``target`` with every leaf replaced by the checkpoint's.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: (a ValueError) the file is not a msgpack checkpoint
        (truncated or foreign), or its tree, a leaf's shape or a leaf's dtype
        differs from ``target``'s; the message names the file and the first
        mismatching entry.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        data = f.read()
    try:
        stored = flax.serialization.msgpack_restore(data)
    except Exception as err:  # msgpack raises several unrelated types for bad bytes
        raise CheckpointError(
            f"{name}: not a readable checkpoint ({len(data)} bytes; {type(err).__name__}: {err})."
        ) from None
    expected = flax.serialization.to_state_dict(jax.device_get(target))
    mismatch = _first_mismatch(stored, expected, ())
    if mismatch is not None:
        raise CheckpointError(f"{name} does not match the target state: {mismatch}.")
    return flax.serialization.from_state_dict(target, stored)


def _first_mismatch(stored: Any, expected: Any, where: tuple[str, ...]) -> str | None:
    """A description of the first place where ``stored`` and ``expected`` differ, or ``None``."""
    at = "/".join(where) or "<root>"
    if isinstance(expected, Mapping):
        if not isinstance(stored, Mapping):
            return f"at {at} the file has a {type(stored).__name__}, the target a mapping"
        missing = [k for k in expected if k not in stored]
        extra = [k for k in stored if k not in expected]
        if missing or extra:
            return f"at {at} the file lacks keys {missing} and has extra keys {extra}"
        for key in expected:
            found = _first_mismatch(stored[key], expected[key], (*where, str(key)))
            if found is not None:
                return found
        return None
    if isinstance(stored, Mapping):
        return f"at {at} the file has a mapping, the target a {type(expected).__name__}"
    if expected is None or stored is None:
        if expected is stored:
            return None
        return f"at {at} one side is None: file {stored!r}, target {expected!r}"
    s, e = np.asarray(stored), np.asarray(expected)
    if s.shape != e.shape:
        return f"at {at} the file has shape {s.shape}, the target {e.shape}"
    # A Python number in the target (a fresh TrainState's step = 0) has no dtype of its
    # own: only its kind (integer, float, bool) is checked.
    python_number = isinstance(expected, (bool, int, float))
    if python_number and s.dtype.kind != e.dtype.kind:
        return f"at {at} the file has dtype {s.dtype}, the target a Python {type(expected).__name__}"
    if not python_number and s.dtype != e.dtype:
        return f"at {at} the file has dtype {s.dtype}, the target {e.dtype}"
    return None
