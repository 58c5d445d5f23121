"""One process of the two-process multi-host test (run by tests/test_training.py).

Usage: python multihost_worker.py PORT PROCESS_ID NUM_STEPS

Each process owns 2 CPU devices; ``jax.distributed.initialize`` joins them into
4 global devices, and the unchanged pmap train step runs on this process's half
of a global batch. Prints one JSON line with the final state for comparison. The test also imports
the model and data from here, so both sides train the same problem.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import softadapt_jax as sj
from softadapt_jax import training

GLOBAL_BATCH = 64
SCALES = (1.0, 10.0, 0.1)


class TinyMLP(nn.Module):
    """Two-layer tanh network with three outputs, one per loss."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(3)(nn.tanh(nn.Dense(16)(x)))


def loss_components(params: dict, batch: dict) -> jax.Array:
    """Three mean-squared errors of very different scales."""
    pred = TinyMLP().apply({"params": params}, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2, axis=0) * jnp.asarray(SCALES)


def global_batch() -> dict:
    x = np.random.default_rng(0).normal(size=(GLOBAL_BATCH, 2)).astype(np.float32)
    y = np.stack([np.sin(x[:, 0]), x[:, 1] ** 2, x[:, 0] * x[:, 1]], axis=1).astype(np.float32)
    return {"x": x, "y": y}


def initial_state() -> training.BalancedTrainState:
    params = TinyMLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))["params"]
    tx = optax.chain(sj.softadapt(0.1, num_losses=3, window=3), optax.adam(1e-2))
    return training.BalancedTrainState.create(apply_fn=TinyMLP().apply, params=params, tx=tx)


def main() -> None:
    port, pid, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    # Both must be set before JAX starts its backend, i.e. before any computation;
    # the test imports this module for its model, so they are not set at import.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60
    )
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    batch = global_batch()
    half = GLOBAL_BATCH // 2
    local = jax.tree.map(lambda a: a[pid * half : (pid + 1) * half], batch)
    state = training.replicate(initial_state())
    pstep = training.make_pmap_train_step(loss_components)
    for _ in range(steps):
        state, _metrics = pstep(state, training.shard_batch(local))
    host = jax.device_get(state)
    replicas_equal = all(
        bool(np.array_equal(leaf[0], leaf[i]))
        for leaf in jax.tree.leaves(host.opt_state)
        for i in range(leaf.shape[0])
    )
    final = training.unreplicate(host)
    out = {
        "process": pid,
        "replicas_equal": replicas_equal,
        "weights": np.asarray(final.weights).tolist(),
        "history": np.asarray(sj.find_balancer_states(final.opt_state)[0].history).tolist(),
        "params": [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(final.params)],
    }
    print(json.dumps(out), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
