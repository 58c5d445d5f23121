"""Cost of a SoftAdapt training step against a plain summed loss, side by side.

Run from the repository root::

    /work/venv/bin/python benchmarks/bench_train_step.py             # full run (~1 min)
    /work/venv/bin/python benchmarks/bench_train_step.py --quick     # smoke test (~20 s)
    /work/venv/bin/python benchmarks/bench_train_step.py --methods sum,softadapt

The model is PINN-sized: an MLP 2 -> 64 -> 64 -> 64 -> 1 with tanh, a batch of
1024 points and K = 4 loss terms (MSEs against four different targets on the
four disjoint quarters of the batch, at scales 1, 10, 0.1 and 1). Each method
is one jitted step ``(params, opt_state, x, y) -> (params, opt_state, loss)``
followed by ``optax.adam``:

* ``sum``: ``jax.value_and_grad`` of ``sum_k L_k`` (the baseline, always run);
* ``softadapt``: path (b), ``value_and_weighted_grad`` with the weights of the
  optimizer state (one backward pass) and ``softadapt`` in the chain;
* ``softadapt_per_component``: path (a), the K per-component gradients from
  ``jax.jacrev`` (one forward, K vectorised backward passes) combined by
  ``softadapt(per_component=True)``.

Timing: compile and warm up first, then ``--repeats`` rounds; in each round
every method runs a chain of dependent steps (the result is waited for at
the end of the chain with ``block_until_ready``), methods in rotating order.
Reported per step: the median and best (fastest round) wall-clock time, the
median process CPU time (all threads; much less inflated than wall time when
other processes compete for the cores), and the ratios to ``sum`` as the
median of the per-round ratios (paired rounds cancel slow drift of a shared
machine), for wall and CPU time.
Target: softadapt / sum <= 1.05.

More balancers become rows by adding an entry to :data:`METHODS` (a name, a
factory ``K -> optax transform`` and which gradient path it takes). The script
prints a markdown table and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softadapt_jax import get_weights, softadapt, value_and_weighted_grad

try:  # python -m benchmarks.bench_train_step
    from benchmarks._timing import (
        calls_per_round,
        fmt_us,
        machine_info_markdown,
        markdown_table,
        time_interleaved,
    )
except ImportError:  # python benchmarks/bench_train_step.py: benchmarks/ is on sys.path
    from _timing import calls_per_round, fmt_us, machine_info_markdown, markdown_table, time_interleaved

TARGET_RATIO = 1.05
BASELINE = "sum"


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table.

    Attributes:
      description: what the step does.
      transform: ``K -> optax transform`` put before adam in an ``optax.chain``
        (``None``: plain summed loss, no balancer).
      path: ``"sum"`` (gradient of the plain sum), ``"weighted"`` (path (b):
        one backward pass of ``sum_k w_k L_k`` with ``get_weights``) or
        ``"per_component"`` (path (a): stacked per-component gradients).
    """

    description: str
    transform: Callable[[int], optax.GradientTransformation] | None
    path: str


METHODS: dict[str, Method] = {
    "sum": Method("plain sum: value_and_grad(sum_k L_k)", None, "sum"),
    "softadapt": Method(
        "SoftAdapt, path (b): value_and_weighted_grad (one backward pass)",
        lambda k: softadapt(0.1, num_losses=k),
        "weighted",
    ),
    "softadapt_per_component": Method(
        "SoftAdapt, path (a): jacrev per-component grads, per_component=True",
        lambda k: softadapt(0.1, num_losses=k, per_component=True),
        "per_component",
    ),
}

# ----------------------------------------------------------------------------------------------
# the problem
# ----------------------------------------------------------------------------------------------

SCALES = (1.0, 10.0, 0.1, 1.0)


def init_mlp(key: jax.Array, sizes: tuple[int, ...] = (2, 64, 64, 64, 1)) -> list[dict[str, jax.Array]]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(1.0 / n_in), "b": jnp.zeros(n_out)}
        for k, (n_in, n_out) in zip(keys, itertools.pairwise(sizes), strict=True)
    ]


def mlp(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return (x @ params[-1]["w"] + params[-1]["b"])[:, 0]


def make_batch(key: jax.Array, batch: int, num_losses: int) -> tuple[jax.Array, jax.Array]:
    """``x [batch, 2]`` and targets ``y [batch]``: a different function on each of K slices."""
    x = jax.random.uniform(key, (batch, 2), minval=-1.0, maxval=1.0)
    funcs = [
        lambda x: jnp.sin(np.pi * x[:, 0]) * jnp.cos(np.pi * x[:, 1]),
        lambda x: x[:, 0] ** 2 - x[:, 1],
        lambda x: jnp.zeros(x.shape[0]),
        lambda x: jnp.exp(-(x[:, 0] ** 2 + x[:, 1] ** 2)),
    ]
    parts = jnp.array_split(x, num_losses)
    y = jnp.concatenate([funcs[k % len(funcs)](p) for k, p in enumerate(parts)])
    return x, y


def loss_components(params: Any, x: jax.Array, y: jax.Array, num_losses: int) -> jax.Array:
    """``[K]`` MSEs on the K disjoint slices of the batch, at different scales."""
    residual = mlp(params, x) - y
    parts = jnp.array_split(residual, num_losses)
    return jnp.stack([SCALES[k % len(SCALES)] * jnp.mean(r**2) for k, r in enumerate(parts)])


def make_step(
    method: Method, num_losses: int, lr: float = 1e-3
) -> tuple[optax.GradientTransformation, Callable]:
    """The optimizer and the jitted step ``(params, opt_state, x, y) -> (params, opt_state, loss)``."""
    adam = optax.adam(lr)
    tx = adam if method.transform is None else optax.chain(method.transform(num_losses), adam)
    components = functools.partial(loss_components, num_losses=num_losses)

    def step(params, opt_state, x, y):
        if method.path == "sum":
            loss, grads = jax.value_and_grad(lambda p: jnp.sum(components(p, x, y)))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
        elif method.path == "weighted":
            (loss, losses), grads = value_and_weighted_grad(components)(get_weights(opt_state), params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
        elif method.path == "per_component":

            def with_aux(p):
                losses = components(p, x, y)
                return losses, losses

            per_component, losses = jax.jacrev(with_aux, has_aux=True)(params)  # leaves [K, ...]
            loss = jnp.dot(get_weights(opt_state), losses)
            updates, opt_state = tx.update(per_component, opt_state, params, losses=losses)
        else:
            raise ValueError(f"unknown gradient path {method.path!r}")
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, jax.jit(step)


def check_paths_agree(num_losses: int, params: Any, x: jax.Array, y: jax.Array, steps: int = 8) -> float:
    """Paths (a) and (b) give the same parameters (the benchmark compares equal computations)."""
    results = []
    for name in ("softadapt", "softadapt_per_component"):
        tx, step = make_step(METHODS[name], num_losses)
        p, s = params, tx.init(params)
        for _ in range(steps):
            p, s, _ = step(p, s, x, y)
        results.append(p)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), *results)
    worst = max(jax.tree.leaves(diffs))
    if worst > 1e-4:
        raise AssertionError(f"paths (a) and (b) disagree by {worst:.2e} after {steps} steps")
    return worst


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated rows from {sorted(METHODS)}; '{BASELINE}' is always added (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="few short rounds, for a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 21, quick 3)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--num-losses", type=int, default=4)
    args = parser.parse_args()
    machine = machine_info_markdown()  # before the run: the load average then is other processes'

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    names = [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]
    repeats = args.repeats or (3 if args.quick else 21)
    round_seconds = 0.03 if args.quick else 0.15
    k = args.num_losses

    key_params, key_data = jax.random.split(jax.random.PRNGKey(0))
    params0 = init_mlp(key_params)
    x, y = make_batch(key_data, args.batch, k)
    num_params = sum(p.size for p in jax.tree.leaves(params0))

    path_diff = None
    if {"softadapt", "softadapt_per_component"} <= set(names):
        path_diff = check_paths_agree(k, params0, x, y)

    runners, number = {}, {}
    for name in names:
        tx, step = make_step(METHODS[name], k)
        carry = [params0, tx.init(params0)]

        def run_one(step=step, carry=carry):
            params, opt_state, loss = step(carry[0], carry[1], x, y)
            carry[0], carry[1] = params, opt_state
            return params, opt_state, loss

        run_one()  # compile
        runners[name] = run_one
        number[name] = calls_per_round(run_one, round_seconds, cap=10_000)

    timings = time_interleaved(runners, repeats=repeats, number=number, warmup=3, block_each=False)

    base = timings[BASELINE]
    rows = []
    ratios, cpu_ratios = {}, {}
    for name in names:
        t = timings[name]
        paired = [a / b for a, b in zip(t.samples, base.samples, strict=True)]
        ratios[name] = float(np.median(paired))
        cpu_paired = [a / b for a, b in zip(t.cpu_samples, base.cpu_samples, strict=True)]
        cpu_ratios[name] = float(np.median(cpu_paired))
        rows.append(
            [
                f"`{name}`",
                METHODS[name].description,
                fmt_us(t.median),
                fmt_us(t.best),
                fmt_us(t.cpu_median),
                f"{ratios[name]:.3f}",
                f"{cpu_ratios[name]:.3f}",
            ]
        )

    print(f"## bench_train_step{' (--quick)' if args.quick else ''}\n")
    print(machine + "\n")
    print(
        f"MLP 2-64-64-64-1 tanh ({num_params:,} parameters), batch {args.batch}, K={k} losses, adam; "
        f"median of {repeats} interleaved rounds of {min(number.values())}-{max(number.values())} "
        "dependent steps each."
        + (f" Paths (a) and (b) agree to max |dparam| = {path_diff:.1e} after 8 steps." if path_diff else "")
        + "\n"
    )
    headers = [
        "method",
        "step",
        "wall median (µs)",
        "wall best (µs)",
        "CPU median (µs)",
        "wall ratio",
        "CPU ratio",
    ]
    print(markdown_table(headers, rows, align="llrrrrr"))
    print("\nRatios vs `sum`: median over rounds of the per-round ratio (wall clock, and process CPU time).")
    if "softadapt" in ratios:
        r, c = ratios["softadapt"], cpu_ratios["softadapt"]

        def verdict(x: float) -> str:
            return "met" if x <= TARGET_RATIO else "NOT met"

        print(
            f"Target softadapt/sum <= {TARGET_RATIO}: wall {r:.3f} ({verdict(r)}), "
            f"CPU {c:.3f} ({verdict(c)})."
        )
    if "softadapt_per_component" in ratios:
        r, c = ratios["softadapt_per_component"], cpu_ratios["softadapt_per_component"]
        print(f"Path (a)/sum: wall {r:.2f}, CPU {c:.2f} (K={k} backward passes, vectorised).")


if __name__ == "__main__":
    main()
