"""SoftAdapt on 4 simulated CPU devices: pmap and sharded jit give the same run.

Trains a small three-output regression (three losses of very different
scales) with the balancer inside the optax chain, once with ``jax.pmap``
(replicated state, batch split across devices, losses and gradients averaged
with ``lax.pmean``) and once with ``jax.jit`` over a ``NamedSharding`` mesh,
printing per-step losses and weights, and checks both against each other.

Run:  python examples/multi_device.py [--steps 30]
(the script sets XLA_FLAGS=--xla_force_host_platform_device_count=4 itself
unless XLA_FLAGS is already set).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import softadapt_jax as sj
from softadapt_jax import training

SCALES = jnp.asarray([1.0, 100.0, 0.01])  # deliberately mismatched loss scales


class Regressor(nn.Module):
    """A tanh MLP with one output per task."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.tanh(nn.Dense(32)(x))
        x = nn.tanh(nn.Dense(32)(x))
        return nn.Dense(3)(x)


def loss_components(params: dict, batch: dict) -> jax.Array:
    """Per-task mean squared errors, scaled as the tasks' units would scale them."""
    pred = Regressor().apply({"params": params}, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2, axis=0) * SCALES


def make_batch(size: int) -> dict:
    x = np.random.default_rng(0).uniform(-2, 2, size=(size, 2)).astype(np.float32)
    y = np.stack([np.sin(2 * x[:, 0]), np.cos(x[:, 1]), x[:, 0] * x[:, 1]], axis=1).astype(np.float32)
    return {"x": x, "y": y}


def make_state() -> training.BalancedTrainState:
    params = Regressor().init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))["params"]
    tx = optax.chain(
        sj.softadapt(0.1, num_losses=3, window=5, variant="loss_weighted", sum_to_k=True),
        optax.adam(3e-3),
    )
    return training.BalancedTrainState.create(apply_fn=Regressor().apply, params=params, tx=tx)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--batch", type=int, default=512, help="global batch size")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    n_dev = jax.local_device_count()
    if args.batch % n_dev:
        parser.error(f"--batch {args.batch} must be a multiple of the {n_dev} devices")
    print(f"{n_dev} devices: {[str(d) for d in jax.devices()]}")
    batch = make_batch(args.batch)

    pstep = training.make_pmap_train_step(loss_components)
    pstate = training.replicate(make_state())
    sharded = training.shard_batch(batch)

    # Sharded jit: the same pure step, the state replicated and the batch split over the mesh.
    rep, split = training.data_shardings(training.data_mesh())
    step = jax.jit(
        training.make_train_step(loss_components), in_shardings=(rep, split), out_shardings=(rep, rep)
    )
    sstate, global_batch = jax.device_put(make_state(), rep), jax.device_put(batch, split)

    print(f"{'step':>4}  {'losses (pmap)':<36} {'weights (pmap)':<30} max|w_pmap - w_jit|")
    for i in range(args.steps):
        pstate, pm = pstep(pstate, sharded)
        sstate, sm = step(sstate, global_batch)
        losses, weights = np.asarray(pm["losses"][0]), np.asarray(pm["weights"][0])
        gap = float(np.max(np.abs(weights - np.asarray(sm["weights"]))))
        print(
            f"{i:>4}  {np.array2string(losses, precision=4):<36} "
            f"{np.array2string(weights, precision=4):<30} {gap:.1e}"
        )

    replicas = jax.device_get(sj.find_balancer_states(pstate.opt_state)[0])
    identical = all(
        np.array_equal(leaf[0], leaf[i]) for leaf in jax.tree.leaves(replicas) for i in range(n_dev)
    )
    print(f"balancer state bitwise identical on all {n_dev} replicas: {identical}")
    final_p = training.unreplicate(pstate)
    gap = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(final_p.params), jax.tree.leaves(sstate.params), strict=True)
    )
    print(f"max |params_pmap - params_sharded_jit| after {args.steps} steps: {gap:.2e}")
    if not identical or gap > 1e-4:
        raise SystemExit("pmap and sharded-jit runs disagree")


if __name__ == "__main__":
    main()
