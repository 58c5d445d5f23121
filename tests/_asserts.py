"""The properties of the contract suite, one ``assert_*`` function each (torchjd's ``_asserts.py`` style).

Each function checks one promised property on the outputs of one method and
knows nothing about which method it is; ``test_contract.py`` computes the
outputs of every case (one compiled program per case) and applies these.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax.balancers.base import BalancerState

STATE_FIELDS = (
    "history", "initial", "filled", "count", "rejected", "accum", "accum_count", "weights",
    "method_state", "recompute_next",
)  # fmt: skip


def assert_trees_close(a: Any, b: Any, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """Same structure, same dtypes, and every leaf close."""
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal_dtypes(a, b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def at(tree: Any, *index: int) -> Any:
    """Every leaf of ``tree`` indexed by ``index`` (one run, one step of stacked states)."""
    return jax.tree.map(lambda x: x[index], tree)


def assert_balancer_state_structure(state: Any, *, window: int, num_losses: int) -> None:
    """A plain ``BalancerState`` of arrays: float32 ``[window, K]``/``[K]`` rows, int32 counters,
    a bool schedule flag, raw ``uint32`` keys, and finite values (the warm-up is usable)."""
    assert isinstance(state, BalancerState) and state._fields == STATE_FIELDS
    chex.assert_shape(state.history, (window, num_losses))
    chex.assert_shape([state.initial, state.accum, state.weights], (num_losses,))
    chex.assert_shape([state.filled, state.count, state.rejected, state.accum_count], ())
    chex.assert_type([state.history, state.initial, state.accum, state.weights], jnp.float32)
    chex.assert_type([state.filled, state.count, state.rejected, state.accum_count], jnp.int32)
    chex.assert_type(state.recompute_next, jnp.bool_)
    for leaf in jax.tree.leaves(state.method_state):
        assert isinstance(leaf, jax.Array)
        assert not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key), "keys must be raw uint32"
    if isinstance(state.method_state, dict) and "key" in state.method_state:
        chex.assert_shape(state.method_state["key"], (2,))
        chex.assert_type(state.method_state["key"], jnp.uint32)
    chex.assert_tree_all_finite(state)


def assert_buffers_not_shared(*states: Any) -> None:
    """No two array leaves of ``states`` hold the same device buffer.

    ``jax.jit(step, donate_argnums=0)`` hands every leaf's buffer to XLA to reuse; a buffer that
    two leaves share (one ``zeros`` array for several fields), or that two fresh states share (an
    array built once by the factory), is refused ("donate the same buffer twice") or deleted
    under the other state's feet.
    """
    seen: dict[int, str] = {}
    for i, state in enumerate(states):
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            if not isinstance(leaf, jax.Array) or leaf.size == 0:
                continue
            where = f"state {i}{jax.tree_util.keystr(path)}"
            for shard in leaf.addressable_shards:
                pointer = shard.data.unsafe_buffer_pointer()
                assert pointer not in seen, f"{where} shares its buffer with {seen[pointer]}"
                seen[pointer] = where


def assert_on_declared_scale(
    weights: Any, weights_sum: float, *, setpoint: Any = None, constant_sum: bool = True, rtol: float = 1e-5
) -> None:
    """Finite, non-negative weights whose sum, once divided by the set-point, is ``weights_sum``.

    Methods without a constant sum (``constant_sum=False``) promise positive weights only.
    """
    w = np.asarray(weights)
    assert np.all(np.isfinite(w)) and np.all(w >= 0), w
    raw = w if setpoint is None else w / np.asarray(setpoint)
    if constant_sum:
        np.testing.assert_allclose(raw.sum(axis=-1), weights_sum, rtol=rtol)
    else:
        assert np.all(w > 0), w


def assert_setpoint_multiplies(with_setpoint: Any, without: Any, setpoint: Any) -> None:
    """``weights = setpoint * weights of the same method without one``."""
    np.testing.assert_allclose(with_setpoint, np.asarray(without) * np.asarray(setpoint), rtol=1e-6)


def assert_rejects_non_finite(
    weights: np.ndarray, states: Any, bad_steps: set[int], clean_weights: np.ndarray
) -> None:
    """Steps with a non-finite loss only count a rejection: weights held, state otherwise untouched.

    Args:
      weights: ``[T, K]`` weights after each step of the stream with bad steps.
      states: the states after each step of that stream (leaves ``[T, ...]``).
      bad_steps: the steps whose losses hold a NaN or an infinity.
      clean_weights: ``[T', K]`` weights of the same stream with the bad steps removed; the
        accepted steps must give exactly these (as if the bad ones never happened).
    """
    chex.assert_tree_all_finite((weights, states))
    steps = len(weights)
    np.testing.assert_array_equal(states.rejected, np.cumsum([t in bad_steps for t in range(steps)]))
    for t in sorted(bad_steps):
        before, after = at(states, t - 1), at(states, t)
        np.testing.assert_array_equal(weights[t], before.weights)
        jax.tree.map(np.testing.assert_array_equal, after._replace(rejected=before.rejected), before)
    keep = [t for t in range(steps) if t not in bad_steps]
    np.testing.assert_allclose(weights[keep], clean_weights[: len(keep)], rtol=1e-6, atol=1e-7)


def assert_expected_structure(update: np.ndarray, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
    """An update of the parameters' shape and dtype, all finite (so the call did not fail)."""
    assert update.shape == shape, update.shape
    assert update.dtype == dtype, update.dtype
    assert np.all(np.isfinite(update)), f"non-finite update {update}"


def assert_batch_matches_single(batched: np.ndarray, singles: list[np.ndarray]) -> None:
    """``vmap`` over a batch gives, element by element, the unbatched results."""
    for i, want in enumerate(singles):
        np.testing.assert_allclose(batched[i], want, rtol=1e-5, atol=1e-6, err_msg=f"batch element {i}")


def assert_replicas_agree(per_replica: Any, want: Any) -> None:
    """Every replica (leading axis) holds the same tree, bit for bit, and it is the single-device one."""
    first = at(per_replica, 0)
    replicas = {leaf.shape[0] for leaf in jax.tree.leaves(per_replica)}  # {} for a state without arrays
    for replica in range(1, max(replicas, default=1)):
        jax.tree.map(np.testing.assert_array_equal, at(per_replica, replica), first)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), first, want)


def assert_serialization_round_trip(state: Any, template: Any) -> None:
    """``flax.serialization`` restores ``state`` into a fresh ``template``: same structure, dtypes, values."""
    restored = flax.serialization.from_bytes(template, flax.serialization.to_bytes(state))
    chex.assert_trees_all_equal_structs(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    chex.assert_trees_all_equal(restored, state)


def assert_trains(losses: np.ndarray) -> None:
    """Finite ``[steps, K]`` losses whose total went down."""
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1].sum() < losses[0].sum(), (losses[0], losses[-1])
