"""Checkpoints: exact round trips, and clear errors for files that do not fit the target."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softadapt_jax as sj
from softadapt_jax.flax.checkpoints import CheckpointError, restore_checkpoint, save_checkpoint


def state_of(num_losses: int = 3, window: int = 4, shape: tuple[int, ...] = (5,), balancer=None):
    balancer = balancer or sj.softadapt_balancer(0.1, num_losses=num_losses, window=window)
    tx = optax.chain(sj.balance(balancer), optax.adam(1e-3))
    params = {"w": jnp.zeros(shape)}
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}


def test_round_trip_is_exact(tmp_path) -> None:
    state = state_of()
    b = sj.softadapt_balancer(0.1, num_losses=3, window=4)
    _, bstate = b.update(jnp.array([1.0, 2.0, 3.0]), sj.find_balancer_states(state["opt_state"])[0])
    state["opt_state"] = (bstate, state["opt_state"][1])
    state["params"]["w"] = jnp.arange(5.0)
    save_checkpoint(tmp_path / "ckpt", state)
    restored = restore_checkpoint(tmp_path / "ckpt", state_of())
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (lambda: state_of(num_losses=4), r"shape \(4, 3\)|shape \(3,\), the target \(4,\)"),
        (lambda: state_of(window=6), r"history the file has shape \(4, 3\), the target \(6, 3\)"),
        (lambda: state_of(shape=(6,)), r"/w the file has shape \(5,\), the target \(6,\)"),
        (lambda: state_of(balancer=sj.relobralo_balancer(num_losses=3)), r"lacks keys|extra keys|shape"),
    ],
)
def test_restore_into_a_different_state_names_the_first_mismatch(tmp_path, target, match) -> None:
    save_checkpoint(tmp_path / "ckpt", state_of())
    with pytest.raises(CheckpointError, match=rf"ckpt does not match the target state: at .*{match}"):
        restore_checkpoint(tmp_path / "ckpt", target())


def test_dtype_mismatch_is_named(tmp_path) -> None:
    save_checkpoint(tmp_path / "ckpt", {"w": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"at w the file has dtype float32, the target float64"):
        restore_checkpoint(tmp_path / "ckpt", {"w": np.zeros(3, np.float64)})


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage", b"PK\x03\x04 a zip file"])
def test_foreign_or_truncated_files_raise_naming_the_file(tmp_path, content) -> None:
    path = tmp_path / "bad.msgpack"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad.msgpack"):
        restore_checkpoint(path, state_of())


def test_truncated_checkpoint_raises(tmp_path) -> None:
    save_checkpoint(tmp_path / "ckpt", state_of())
    data = (tmp_path / "ckpt").read_bytes()
    (tmp_path / "ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt: not a readable checkpoint"):
        restore_checkpoint(tmp_path / "ckpt", state_of())


def test_missing_file_is_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        restore_checkpoint(tmp_path / "nope", state_of())
