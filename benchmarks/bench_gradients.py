"""Cost of the gradient-level methods (PCGrad, MGDA, CAGrad, GradNorm) against the plain sum and SoftAdapt.

Run from the repository root::

    /work/venv/bin/python benchmarks/bench_gradients.py          # K = 2, 4, 8 (~3-4 min, loaded 2-core box)
    /work/venv/bin/python benchmarks/bench_gradients.py --quick  # smoke test: fewer, shorter rounds

The problem is the PINN-sized one of ``bench_train_step.py``: an MLP
2 -> 64 -> 64 -> 64 -> 1 with tanh, a batch of 1024 points, K loss terms (MSEs
against different targets on K disjoint slices of the batch). Every row is one
jitted train step ending in ``optax.adam(1e-3)``:

* ``sum``: ``jax.value_and_grad`` of ``sum_k L_k`` -- the baseline;
* ``softadapt``: path (b), one backward pass of ``sum_k w_k L_k``
  (``value_and_weighted_grad``) with ``softadapt`` in the chain;
* ``pcgrad``, ``mgda``, ``cagrad``, ``gradnorm``: the K per-component gradients
  (``per_component_grads``: one forward, K backward passes batched with
  ``vmap``) and the transform in the chain (no mask: every layer is shared;
  GradNorm on the last hidden layer's kernel);
* ``mgda_gram``: MGDA without stacking the gradients: the Gramian by
  ``gramian(method="sequential")`` (2K sequential linear passes), the weights
  by ``mgda_weights``, then one weighted backward pass -- the low-memory route.

Time: interleaved rounds (rotating order) of dependent steps, the median per
step over rounds, with the process CPU time next to it (less inflated than
wall time on a shared machine) and the median per-round ratios to ``sum`` and
to ``softadapt``.

Memory: device memory statistics (``device.memory_stats()``) are not
available on the CPU backend, so the table reports XLA's compile-time
estimate instead, ``jax.jit(step).lower(...).compile().memory_analysis()``:
``temp`` is the scratch XLA allocates for the step (activations, the K stacked
gradients, solver buffers), ``args`` the inputs (parameters, optimizer state,
batch). These are the buffer sizes of the compiled program, not a measured
peak, but they are what the extra K x P of the stacked gradients shows up in.
The script prints markdown and writes nothing.

``--aggregators`` instead times every Jacobian aggregator of the registry
(``gradients.aggregator(name)``) on float32 Jacobians ``J [K, n]`` (``--dims``,
default the MLP's n = 8,577 and 100,000) for K = 2, 4, 8, 16: the jitted
``agg(J)`` (stateful methods: one ``update`` from their state) against the plain
sum ``J.sum(0)`` and, for the Gramian weightings, against the Gramian route of
the optax adapter (``J J^T``, the weights, ``w @ J``, formed in one program);
and XLA's scratch memory of each program.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import softadapt_jax as sj
from softadapt_jax.gradients import (
    cagrad,
    gradnorm,
    gramian,
    mgda,
    mgda_weights,
    pcgrad,
    per_component_grads,
)

try:  # python -m benchmarks.bench_gradients
    from benchmarks._timing import (
        calls_per_round,
        fmt_us,
        machine_info_markdown,
        markdown_table,
        time_interleaved,
    )
except ImportError:  # python benchmarks/bench_gradients.py: benchmarks/ is on sys.path
    from _timing import calls_per_round, fmt_us, machine_info_markdown, markdown_table, time_interleaved

BATCH = 1024
SIZES = (2, 64, 64, 64, 1)
METHODS = ("sum", "softadapt", "pcgrad", "mgda", "mgda_gram", "cagrad", "gradnorm")
TARGETS = (
    lambda x: jnp.sin(np.pi * x[:, 0]) * jnp.cos(np.pi * x[:, 1]),
    lambda x: x[:, 0] ** 2 - x[:, 1],
    lambda x: jnp.zeros(x.shape[0]),
    lambda x: jnp.exp(-(x[:, 0] ** 2 + x[:, 1] ** 2)),
)
SCALES = (1.0, 10.0, 0.1, 1.0)

Params = list[dict[str, jax.Array]]
Batch = tuple[jax.Array, jax.Array]


def init_mlp(key: jax.Array) -> Params:
    keys = jax.random.split(key, len(SIZES) - 1)
    return [
        {"w": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(1.0 / n_in), "b": jnp.zeros(n_out)}
        for k, (n_in, n_out) in zip(keys, itertools.pairwise(SIZES), strict=True)
    ]


def mlp(params: Params, x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return (x @ params[-1]["w"] + params[-1]["b"])[:, 0]


def make_batch(key: jax.Array, num_losses: int) -> Batch:
    """All 1024 points and their targets; slice k (a contiguous block) belongs to loss k."""
    x = jax.random.uniform(key, (BATCH, 2), minval=-1.0, maxval=1.0)
    parts = np.array_split(np.arange(BATCH), num_losses)
    y = jnp.concatenate([TARGETS[k % len(TARGETS)](x[idx]) for k, idx in enumerate(parts)])
    return x, y


def make_loss_components(num_losses: int) -> Callable[[Params, Batch], jax.Array]:
    bounds = np.cumsum([len(p) for p in np.array_split(np.arange(BATCH), num_losses)])[:-1]
    scales = jnp.asarray([SCALES[k % len(SCALES)] for k in range(num_losses)])

    def loss_components(params: Params, batch: Batch) -> jax.Array:
        x, y = batch
        sq = (mlp(params, x) - y) ** 2  # one forward pass over all points
        return jnp.stack([jnp.mean(s) for s in jnp.split(sq, bounds)]) * scales

    return loss_components


def make_step(method: str, num_losses: int) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
    """(tx, step(params, opt_state, batch) -> (params, opt_state)) for one row."""
    f = make_loss_components(num_losses)
    adam = optax.adam(1e-3)
    if method == "sum":
        tx = adam

        def grads_of(params: Params, opt_state: Any, batch: Batch) -> tuple[jax.Array, Any]:
            losses, vjp = jax.vjp(lambda p: f(p, batch), params)
            return losses, vjp(jnp.ones(num_losses))[0]

    elif method == "softadapt":
        tx = optax.chain(sj.softadapt(0.1, num_losses=num_losses), adam)

        def grads_of(params: Params, opt_state: Any, batch: Batch) -> tuple[jax.Array, Any]:
            (_, losses), grads = sj.value_and_weighted_grad(f)(sj.get_weights(opt_state), params, batch)
            return losses, grads

    elif method == "mgda_gram":
        tx = adam

        def grads_of(params: Params, opt_state: Any, batch: Batch) -> tuple[jax.Array, Any]:
            losses, g = gramian(f, method="sequential")(params, batch)
            (_, _), grads = sj.value_and_weighted_grad(f)(mgda_weights(g), params, batch)
            return losses, grads

    else:
        combiner = {
            "pcgrad": lambda: pcgrad(seed=0),
            "mgda": mgda,
            "cagrad": lambda: cagrad(0.5),
            "gradnorm": lambda: gradnorm(num_losses=num_losses, layer="2/w"),
        }[method]()
        tx = optax.chain(combiner, adam)

        def grads_of(params: Params, opt_state: Any, batch: Batch) -> tuple[jax.Array, Any]:
            return per_component_grads(f)(params, batch)

    def step(params: Params, opt_state: Any, batch: Batch) -> tuple[Params, Any]:
        losses, grads = grads_of(params, opt_state, batch)
        updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
        return optax.apply_updates(params, updates), opt_state

    return tx, step


def make_runner(method: str, num_losses: int, params0: Params, batch: Batch) -> tuple[Callable[[], Any], Any]:
    """``(run_one, memory_analysis)``: one compiled step advancing its own state, and XLA's estimate."""
    tx, step = make_step(method, num_losses)
    state = {"params": params0, "opt": tx.init(params0)}
    compiled = jax.jit(step).lower(state["params"], state["opt"], batch).compile()

    def run_one() -> Any:
        state["params"], state["opt"] = compiled(state["params"], state["opt"], batch)
        return state["params"]

    return run_one, compiled.memory_analysis()


def median_ratio(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


AGGREGATOR_CONFIG = {
    "cagrad": {"c": 0.5},
    "fairgrad": {"alpha": 1.0},
    "krum": {"n_byzantine": 1},
    "trimmed_mean": {"trim_number": 1},
}
# Methods that need more rows than K = 2 offers, or three batches per step.
AGGREGATOR_MIN_K = {"krum": 4, "trimmed_mean": 3}
THREE_BATCHES = ("modo", "sdmgrad")


def aggregator_program(name: str, k: int, n: int) -> tuple[Any, Callable[..., Any], tuple[Any, ...]]:
    """``(agg, fn, args)``: aggregator ``name`` and its jitted call on a random ``[K, n]`` Jacobian."""
    from softadapt_jax.gradients.aggregators import aggregator

    agg = aggregator(name, **AGGREGATOR_CONFIG.get(name, {}))
    shape = (3, k, n) if name in THREE_BATCHES else (k, n)
    jac = jax.random.normal(jax.random.PRNGKey(k), shape, jnp.float32)
    losses = jnp.linspace(0.5, 2.0, k, dtype=jnp.float32)
    key = jax.random.PRNGKey(0)
    state = agg.init(k, n, jnp.float32) if agg.stateful else ()

    def fn(j: jax.Array, s: Any) -> jax.Array:
        d, _ = agg.update(
            j, s, losses=losses if agg.needs_losses else None, key=key if agg.needs_key else None
        )
        return d

    return agg, jax.jit(fn), (jac, state)


def aggregator_rows(
    names: list[str], ks: list[int], dims: list[int], repeats: int, round_s: float
) -> list[list[Any]]:
    """Rows of the aggregator table: every method at every (K, n), timed beside the plain sum."""
    from softadapt_jax.gradients.aggregators._core import gramian_of

    rows = []
    for n in dims:
        for k in ks:
            jac = jax.random.normal(jax.random.PRNGKey(k), (k, n), jnp.float32)
            programs = {"sum": (jax.jit(lambda j: j.sum(0)), (jac,))}
            for name in names:
                if k < AGGREGATOR_MIN_K.get(name, 2):
                    continue
                agg, fn, args = aggregator_program(name, k, n)
                programs[name] = (fn, args)
                if agg.weighting is not None and not agg.stateful:
                    # The weighting takes the method's key and losses as keywords, as the adapter passes them.
                    extra = {"key": jax.random.PRNGKey(0)} if agg.needs_key else {}
                    if agg.needs_losses:
                        extra["losses"] = jnp.ones(k, jnp.float32)
                    gram_route = jax.jit(lambda j, w=agg.weighting, e=extra: w(gramian_of(j), **e) @ j)
                    programs[f"{name} (Gramian route)"] = (gram_route, (jac,))
            compiled = {m: fn.lower(*a).compile() for m, (fn, a) in programs.items()}
            runners = {m: (lambda c=compiled[m], a=programs[m][1]: c(*a)) for m in programs}
            number = {m: calls_per_round(fn, round_s) for m, fn in runners.items()}
            timings = time_interleaved(runners, repeats=repeats, number=number, warmup=1)
            base = timings["sum"]
            for m in programs:
                if m == "sum":
                    continue
                t = timings[m]
                rows.append(
                    [
                        n,
                        k,
                        m,
                        fmt_us(t.median),
                        fmt_us(t.cpu_median),
                        f"{median_ratio(t.samples, base.samples):.1f}",
                        f"{compiled[m].memory_analysis().temp_size_in_bytes / 2**20:.2f}",
                    ]
                )
            rows.append(
                [
                    n,
                    k,
                    "sum",
                    fmt_us(base.median),
                    fmt_us(base.cpu_median),
                    "1.0",
                    f"{compiled['sum'].memory_analysis().temp_size_in_bytes / 2**20:.2f}",
                ]
            )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer and shorter rounds (smoke test)")
    p.add_argument("--ks", default="2,4,8", help="comma-separated numbers of losses K (each >= 2)")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (default 15, quick 3)")
    p.add_argument("--aggregators", action="store_true", help="time every Jacobian aggregator instead")
    p.add_argument("--agg-ks", default="2,4,8,16", help="K values of the aggregator table")
    p.add_argument("--dims", default="8577,100000", help="comma-separated n of the aggregator table")
    p.add_argument("--names", default="all", help="comma-separated aggregator names, or 'all'")
    args = p.parse_args(argv)
    try:
        args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        p.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if not args.ks or any(k < 2 or k > BATCH for k in args.ks):
        p.error(f"--ks must list integers in [2, {BATCH}], got {args.ks}")
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    round_seconds = 0.05 if args.quick else 0.2
    if args.aggregators:
        from softadapt_jax.gradients.aggregators import names

        chosen = list(names()) if args.names == "all" else [x.strip() for x in args.names.split(",")]
        ks = [int(x) for x in args.agg_ks.split(",")]
        dims = [int(x) for x in args.dims.split(",")]
        rows = aggregator_rows(chosen, ks, dims, args.repeats, round_seconds)
        print(f"Machine: {machine_info_markdown()}\n")
        print(
            f"float32 Jacobians J [K, n], jitted; {args.repeats} interleaved rounds of ~{round_seconds}s "
            "per row; '/ sum' is the median per-round ratio to J.sum(0) at the same (n, K).\n"
        )
        headers = ["n", "K", "method", "µs/call", "CPU µs/call", "/ sum", "temp MiB"]
        print(markdown_table(headers, rows, align="rrl" + "r" * 4))
        return
    params0 = init_mlp(jax.random.PRNGKey(0))
    rows = []
    for k in args.ks:
        batch = make_batch(jax.random.PRNGKey(1), k)
        runners, memory = {}, {}
        for method in METHODS:
            runners[method], memory[method] = make_runner(method, k, params0, batch)
        number = {m: calls_per_round(fn, round_seconds) for m, fn in runners.items()}
        timings = time_interleaved(runners, repeats=args.repeats, number=number, warmup=1)
        base, soft = timings["sum"], timings["softadapt"]
        base_temp = memory["sum"].temp_size_in_bytes
        for method in METHODS:
            t, mem = timings[method], memory[method]
            rows.append(
                [
                    k,
                    method,
                    fmt_us(t.median),
                    fmt_us(t.cpu_median),
                    f"{median_ratio(t.samples, base.samples):.2f}",
                    f"{median_ratio(t.samples, soft.samples):.2f}",
                    f"{mem.temp_size_in_bytes / 2**20:.2f}",
                    f"{mem.argument_size_in_bytes / 2**20:.2f}",
                    f"{mem.temp_size_in_bytes / max(base_temp, 1):.2f}",
                ]
            )
    print(f"Machine: {machine_info_markdown()}\n")
    print(
        f"PINN-sized MLP {' -> '.join(map(str, SIZES))}, batch {BATCH}, adam; "
        f"{args.repeats} interleaved rounds of ~{round_seconds}s per row.\n"
    )
    headers = [
        "K",
        "method",
        "µs/step",
        "CPU µs/step",
        "/ sum",
        "/ softadapt",
        "temp MiB",
        "args MiB",
        "temp / sum",
    ]
    print(markdown_table(headers, rows, align="ll" + "r" * 7))
    print(
        "\nMemory columns: XLA compile-time buffer sizes (memory_analysis), not measured peaks: "
        "device memory statistics are not available on CPU."
    )


if __name__ == "__main__":
    main()
