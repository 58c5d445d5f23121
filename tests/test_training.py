"""Train state and step builders: one device, pmap, sharded jit, multi-process, NNX, checkpoints."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import softadapt_jax as sj
from softadapt_jax import training

sys.path.insert(0, str(Path(__file__).parent))
import multihost_worker as mw

NUM_STEPS = 8


@pytest.fixture(scope="module")
def batch() -> dict:
    return mw.global_batch()


def run_single(state: training.BalancedTrainState, batch: dict, steps: int = NUM_STEPS):
    step = jax.jit(training.make_train_step(mw.loss_components))
    for _ in range(steps):
        state, metrics = step(state, batch)
    return state, metrics


def test_single_device_step_metrics(batch: dict) -> None:
    state, metrics = run_single(mw.initial_state(), batch)
    assert int(state.step) == NUM_STEPS
    chex.assert_shape([metrics["losses"], metrics["weights"]], (3,))
    chex.assert_tree_all_finite(metrics)
    np.testing.assert_allclose(metrics["total"], jnp.vdot(metrics["weights"], metrics["losses"]), rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], jnp.sum(metrics["losses"]), rtol=1e-6)
    # After the 3-entry window filled, the weights adapted away from uniform.
    assert not np.allclose(state.weights, 1 / 3)


def test_train_step_uses_weights_before_recording_losses(batch: dict) -> None:
    state = mw.initial_state()
    w0 = state.weights
    _, metrics = jax.jit(training.make_train_step(mw.loss_components))(state, batch)
    np.testing.assert_array_equal(metrics["weights"], w0)


def test_step_jitted_with_a_donated_state_matches_the_plain_jit(batch: dict) -> None:
    # Donation (jax.jit(step, donate_argnums=0), as large models train) needs every leaf of the
    # state in a buffer of its own; the donated run must equal the plain one.
    step = training.make_train_step(mw.loss_components)
    plain, donating = jax.jit(step), jax.jit(step, donate_argnums=0)
    want, got = mw.initial_state(), mw.initial_state()
    for _ in range(4):
        want, want_metrics = plain(want, batch)
        got, metrics = donating(got, batch)
    chex.assert_trees_all_close(got.params, want.params, rtol=0, atol=0)
    chex.assert_trees_all_close(got.opt_state, want.opt_state, rtol=0, atol=0)
    chex.assert_trees_all_close(metrics, want_metrics, rtol=0, atol=0)


def test_pmap_matches_single_device_and_replicas_identical(batch: dict) -> None:
    assert jax.local_device_count() == 4, "conftest sets 4 simulated CPU devices"
    single, _ = run_single(mw.initial_state(), batch)
    pstep = training.make_pmap_train_step(mw.loss_components)
    state = training.replicate(mw.initial_state())
    sharded = training.shard_batch(batch)
    for _ in range(NUM_STEPS):
        state, metrics = pstep(state, sharded)
    host = jax.device_get(state)
    for leaf in jax.tree.leaves(host.opt_state):
        for i in range(1, 4):
            np.testing.assert_array_equal(leaf[0], leaf[i])
    multi = training.unreplicate(host)
    chex.assert_trees_all_close(multi.params, single.params, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(multi.weights, single.weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["losses"][0], metrics["losses"][3])


def test_sharded_jit_matches_single_device(batch: dict) -> None:
    single, _ = run_single(mw.initial_state(), batch)
    # The sharded-jit recipe of softadapt_jax.training: replicated state, batch split on axis 0.
    rep, split = training.data_shardings(training.data_mesh())
    step = jax.jit(
        training.make_train_step(mw.loss_components), in_shardings=(rep, split), out_shardings=(rep, rep)
    )
    state, global_batch = jax.device_put(mw.initial_state(), rep), jax.device_put(batch, split)
    for _ in range(NUM_STEPS):
        state, _ = step(state, global_batch)
    assert len(state.params["Dense_0"]["kernel"].sharding.device_set) == 4
    chex.assert_trees_all_close(state.params, single.params, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(state.weights, single.weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("balancer", ["softadapt", "grad_norm"])
def test_wrong_length_loss_vector_names_shapes(batch: dict, balancer: str) -> None:
    # grad_norm's step is a cond whose recompute branch (traced first) also computes the statistic.
    def two_losses(params, b):
        return mw.loss_components(params, b)[:2]

    state, bal = mw.initial_state(), None
    if balancer == "grad_norm":
        bal = sj.inverse_grad_norm_balancer(num_losses=3)
        tx = optax.chain(sj.balance(bal), optax.adam(1e-2))
        state = training.BalancedTrainState.create(apply_fn=state.apply_fn, params=state.params, tx=tx)
    step = jax.jit(training.make_train_step(two_losses, balancer=bal))
    with pytest.raises(ValueError, match=r"matching `weights` of shape \(3,\); got losses of shape \(2,\)"):
        step(state, batch)


def test_batch_not_divisible_by_devices(batch: dict) -> None:
    odd = jax.tree.map(lambda a: a[:30], batch)
    with pytest.raises(ValueError, match=r"leading axis 30.*4 devices"):
        training.shard_batch(odd, 4)


def test_batch_leaves_disagree() -> None:
    with pytest.raises(ValueError, match="share a leading batch axis"):
        training.shard_batch({"a": np.zeros((8, 2)), "b": np.zeros((4,))}, 4)


def test_checkpoint_resume_identical(batch: dict, tmp_path: Path) -> None:
    step = jax.jit(training.make_train_step(mw.loss_components))
    full = mw.initial_state()
    for _ in range(2 * NUM_STEPS):
        full, _ = step(full, batch)

    half = mw.initial_state()
    for _ in range(NUM_STEPS):
        half, _ = step(half, batch)
    path = tmp_path / "ckpt.msgpack"
    training.save_checkpoint(path, half)
    resumed = training.restore_checkpoint(path, mw.initial_state())
    assert int(resumed.step) == NUM_STEPS
    for _ in range(NUM_STEPS):
        resumed, _ = step(resumed, batch)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_apply_gradients_forwards_losses() -> None:
    # Flax's own TrainState.apply_gradients would drop `losses`; ours must not.
    state = mw.initial_state()
    grads = jax.tree.map(jnp.zeros_like, state.params)
    new = state.apply_gradients(grads=grads, losses=jnp.array([1.0, 2.0, 3.0]))
    bstate = sj.find_balancer_states(new.opt_state)[0]
    np.testing.assert_array_equal(bstate.history[-1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="needs the current component losses"):
        state.apply_gradients(grads=grads)


class NNXModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(2, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def test_nnx_optimizer_passes_losses(batch: dict) -> None:
    model = NNXModel(nnx.Rngs(0))
    tx = optax.chain(sj.softadapt(0.1, num_losses=3, window=3), optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_components(m: NNXModel, b: dict) -> jax.Array:
        return jnp.mean((m(b["x"]) - b["y"]) ** 2, axis=0) * jnp.asarray(mw.SCALES)

    @nnx.jit
    def step(m: NNXModel, opt: nnx.Optimizer, b: dict) -> jax.Array:
        weights = sj.get_weights(nnx.as_pure(opt.opt_state))

        def weighted(mm: NNXModel) -> tuple[jax.Array, jax.Array]:
            losses = loss_components(mm, b)
            return jnp.vdot(weights, losses), losses

        (_, losses), grads = nnx.value_and_grad(weighted, has_aux=True)(m)
        opt.update(m, grads, losses=losses)
        return losses

    first = step(model, optimizer, batch)
    for _ in range(NUM_STEPS):
        last = step(model, optimizer, batch)
    state = sj.find_balancer_states(nnx.as_pure(optimizer.opt_state))[0]
    assert int(state.count) == NUM_STEPS + 1
    np.testing.assert_allclose(state.history[-1], last, rtol=1e-6)
    assert float(jnp.sum(last)) < float(jnp.sum(first))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_pmap_over_four_global_devices(batch: dict) -> None:
    port = _free_port()
    worker = Path(__file__).parent / "multihost_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(port), str(pid), str(NUM_STEPS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    a, b = outputs
    assert a["replicas_equal"] and b["replicas_equal"]
    assert a["weights"] == b["weights"] and a["history"] == b["history"] and a["params"] == b["params"]
    single, _ = run_single(mw.initial_state(), batch)
    np.testing.assert_allclose(a["weights"], single.weights, rtol=1e-5, atol=1e-7)
    for got, want in zip(a["params"], jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(got, np.asarray(want).ravel(), rtol=1e-5, atol=1e-5)
