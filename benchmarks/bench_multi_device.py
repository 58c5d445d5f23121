"""Step time of the Flax train step on one device (jit), 4 devices (pmap) and 4 devices (sharded jit).

A correctness-oriented run, not a speed claim: the 4 "devices" are simulated
on the same CPU cores (``XLA_FLAGS=--xla_force_host_platform_device_count=4``,
set here unless already set), so they share two cores. The model is the
three-output regression of ``examples/multi_device.py`` (global batch 512)
with SoftAdapt (loss-weighted, window 5) in the optax chain. Each layout runs
``--steps`` steps per round, rounds interleaved, median reported.

Run:  python benchmarks/bench_multi_device.py [--steps 50] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import multi_device as md

from softadapt_jax import training


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument(
        "--rounds", type=int, default=7, help="alternating rounds per layout (the median is reported)"
    )
    args = parser.parse_args()
    batch = md.make_batch(512)
    n_dev = jax.local_device_count()

    single = jax.jit(training.make_train_step(md.loss_components))
    pstep = training.make_pmap_train_step(md.loss_components)
    rep, split = training.data_shardings(training.data_mesh())
    sstep = jax.jit(
        training.make_train_step(md.loss_components), in_shardings=(rep, split), out_shardings=(rep, rep)
    )
    layouts = {
        "jit, 1 device": (single, md.make_state(), jax.device_put(batch)),
        f"pmap, {n_dev} devices": (pstep, training.replicate(md.make_state()), training.shard_batch(batch)),
        f"sharded jit, {n_dev} devices": (
            sstep,
            jax.device_put(md.make_state(), rep),
            jax.device_put(batch, split),
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for name, (fn, state, b) in layouts.items():  # compile and warm up
        state, m = fn(state, b)
        jax.block_until_ready(m)
        layouts[name] = (fn, state, b)
    for _ in range(args.rounds):
        for name, (fn, state, b) in layouts.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = fn(state, b)
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t0) / args.steps)
            layouts[name] = (fn, state, b)
    base = np.median(times["jit, 1 device"])
    print(
        f"{n_dev} simulated CPU devices on {os.cpu_count()} cores; jax {jax.__version__}; "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    print("| layout | median step (µs) | ratio to jit, 1 device |")
    print("|---|--:|--:|")
    for name, ts in times.items():
        print(f"| {name} | {1e6 * np.median(ts):,.0f} | {np.median(ts) / base:.2f} |")


if __name__ == "__main__":
    main()
