"""Latency and throughput of :func:`softadapt_jax.softadapt_weights` against the original algorithm.

Run from the repository root::

    /work/venv/bin/python benchmarks/bench_weights.py            # full run (~1 min)
    /work/venv/bin/python benchmarks/bench_weights.py --quick    # smoke test (~15 s)

What is measured, side by side in one process (rounds interleaved; median and fastest round reported):

1. Per-call latency of the jitted ``softadapt_weights`` (history already on the
   device, result waited for with ``block_until_ready``) against a faithful
   NumPy port of the original PyTorch SoftAdapt 0.0.5 written below: a Python
   loop over components, finite-difference coefficients recomputed on every
   call (hard-coded constants for orders 1, 3, 5; a Vandermonde solve with
   ``numpy.linalg.solve`` for even orders, as ``findiff.coefficients`` does),
   float64 slopes, the softmax ``e = exp(beta*(x - max x)); e / (sum e + 1e-8)``
   and float32 loss means. The port leaves out torch's tensor overheads and
   findiff's extra centre/backward solves, so it is *faster* than the original;
   speedups against it are conservative. The original measured ~265 µs per
   call for K=3, T=5. A trivial jitted call (``h + 1``) is timed alongside as
   the floor that JAX dispatch sets on this machine.
   Cases: K=3, T=5 (order None = 4, the original's default) and K=16, T=50.
   For T=50 the original's default order (T-1 = 49, odd and > 5) raises
   ValueError, so the port runs with ``accuracy_order=4`` (last 5 points, loss
   means over all 50); the library is timed with order 4 and with its default
   order 49.
2. Throughput of one jitted ``jax.vmap`` call over 100,000 histories (K=3,
   T=5), in histories per second.

Before timing, the port is checked against the library on random histories
(and, when ``tests/data/softadapt_reference_public.json`` is present, against
the original's recorded outputs).

Targets: jitted call >= 20x faster than ~265 µs (i.e. <= 13.3 µs) for K=3, T=5;
batched >= 10 million histories/s. The script prints markdown tables and writes
nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax import softadapt_weights

try:  # python -m benchmarks.bench_weights
    from benchmarks._timing import (
        calls_per_round,
        fmt_us,
        machine_info_markdown,
        markdown_table,
        time_interleaved,
    )
except ImportError:  # python benchmarks/bench_weights.py: benchmarks/ is on sys.path
    from _timing import calls_per_round, fmt_us, machine_info_markdown, markdown_table, time_interleaved

VARIANTS = ("original", "normalized", "loss_weighted")
ORIGINAL_US = 265.0  # the per-call time of the original (K=3, T=5) the targets are stated against
TARGET_SPEEDUP = 20.0
TARGET_THROUGHPUT = 10e6
REPO = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = REPO / "tests" / "data" / "softadapt_reference_public.json"

# ----------------------------------------------------------------------------------------------
# NumPy port of the original (softadapt 0.0.5: _get_finite_difference, _softmax, the variants)
# ----------------------------------------------------------------------------------------------

_FIRST_ORDER_COEFFICIENTS = np.array((-1, 1))
_THIRD_ORDER_COEFFICIENTS = np.array((-11 / 6, 3, -3 / 2, 1 / 3))
_FIFTH_ORDER_COEFFICIENTS = np.array((-137 / 60, 5, -5, 10 / 3, -5 / 4, 1 / 5))
_EPSILON = 1e-8


def findiff_forward_coefficients(acc: int) -> np.ndarray:
    """``findiff.coefficients(deriv=1, acc=acc)["forward"]["coefficients"]`` for even ``acc``.

    Offsets 0..acc; solve ``sum_j c_j j^i = d/dx x^i at 0`` (1 for i = 1, else 0),
    numerically, on every call (as the original does).
    """
    offsets = range(acc + 1)
    matrix = np.array([[j**i for j in offsets] for i in range(acc + 1)])
    rhs = np.zeros(acc + 1)
    rhs[1] = 1.0  # factorial(deriv) at row deriv
    return np.linalg.solve(matrix, rhs)


def original_finite_difference(input_array: np.ndarray, order: int | None = None) -> np.float64:
    """The original's ``_get_finite_difference`` (its unconditional print left out)."""
    if order is None:
        order = len(input_array) - 1
    elif order > len(input_array):
        raise ValueError("The finite-difference order can not be larger than the number of loss points.")
    elif order + 1 < len(input_array):
        input_array = input_array[(-1 * order - 1) :]
    order_is_even = order % 2 == 0
    if order > 5 and not order_is_even:
        raise ValueError("Accuracy orders larger than 5 must be even.")
    if order_is_even:
        constants = findiff_forward_coefficients(order)
    elif order == 1:
        constants = _FIRST_ORDER_COEFFICIENTS
    elif order == 3:
        constants = _THIRD_ORDER_COEFFICIENTS
    else:
        constants = _FIFTH_ORDER_COEFFICIENTS
    pointwise_multiplication = [input_array[i] * constants[i] for i in range(len(constants))]
    return np.sum(pointwise_multiplication)


def original_softmax(x: np.ndarray, beta: float, numerator_weights: np.ndarray | None = None) -> np.ndarray:
    exp_of_input = np.exp(beta * (x - x.max()))
    if numerator_weights is not None:
        exp_of_input = numerator_weights * exp_of_input
    return exp_of_input / (np.sum(exp_of_input) + _EPSILON)


def original_weights(
    components: list[np.ndarray], beta: float, variant: str, accuracy_order: int | None = None
) -> np.ndarray:
    """``get_component_weights(*components)`` of the original: one loop over components per call."""
    rates_of_change = []
    average_loss_values = []
    for loss_points in components:
        rates_of_change.append(original_finite_difference(loss_points, accuracy_order))
        if variant == "loss_weighted":
            # torch.mean(x.float()): float32 mean
            average_loss_values.append(np.mean(loss_points.astype(np.float32), dtype=np.float32))
    rates = np.array(rates_of_change)
    if variant == "normalized":
        rates = rates / np.sum(rates)
    numerator = np.array(average_loss_values, np.float32) if variant == "loss_weighted" else None
    return original_softmax(rates, beta, numerator)


# ----------------------------------------------------------------------------------------------
# inputs and checks
# ----------------------------------------------------------------------------------------------


def make_histories(rng: np.random.Generator, n: int, t: int, k: int) -> np.ndarray:
    """``[n, T, K]`` float32 positive, decreasing loss curves of different scales and rates."""
    scale = 10.0 ** rng.uniform(-2, 2, (n, 1, k))
    rate = rng.uniform(0.02, 0.5, (n, 1, k))
    steps = np.arange(t, dtype=np.float64)[None, :, None]
    noise = 1.0 + 0.01 * rng.standard_normal((n, t, k))
    return (scale * np.exp(-rate * steps) * noise).astype(np.float32)


def check_port_against_library(lib: dict, cases: list[tuple[int, int, int | None]], rng) -> float:
    """Max |dw| between the port (float64) and the library (float32) on random histories."""
    worst = 0.0
    for k, t, order in cases:
        for hist in make_histories(rng, 4, t, k):
            for variant in VARIANTS:
                mine = np.asarray(lib[variant](jnp.asarray(hist), jnp.float32(0.5), accuracy_order=order))
                port = original_weights(list(hist.T), 0.5, variant, order)
                np.testing.assert_allclose(mine, port, rtol=2e-4, atol=1e-6, err_msg=f"{variant} K={k} T={t}")
                worst = max(worst, float(np.max(np.abs(mine - port))))
    return worst


def check_port_against_reference(max_cases: int = 300) -> tuple[int, float] | None:
    """Max |dw| between the port and the original's recorded outputs (float64 inputs, finite cases)."""
    if not REFERENCE.exists():
        return None
    data = json.loads(REFERENCE.read_text())
    checked, worst = 0, 0.0
    for case in data["cases"]:
        if case["error"] is not None or set(case["input_dtypes"]) != {"float64"}:
            continue
        expected = np.array([float(v) for v in case["weights"]])
        if not np.all(np.isfinite(expected)) or case["intermediate"].get("ill_conditioned"):
            continue
        components = [np.asarray(h, np.float64) for h in case["histories"]]
        got = original_weights(components, case["beta"], case["variant"], case["accuracy_order"])
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9, err_msg=case["id"])
        worst = max(worst, float(np.max(np.abs(got - expected))))
        checked += 1
        if checked >= max_cases:
            break
    return checked, worst


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 15, quick 3)")
    parser.add_argument("--batch", type=int, default=100_000, help="histories in the vmapped call")
    args = parser.parse_args()
    machine = machine_info_markdown()  # before the run: the load average then is other processes'
    repeats = args.repeats or (3 if args.quick else 15)
    round_seconds = 0.01 if args.quick else 0.04
    rng = np.random.default_rng(0)

    lib = {
        v: jax.jit(functools.partial(softadapt_weights, variant=v), static_argnames=("accuracy_order",))
        for v in VARIANTS
    }
    beta = jnp.float32(0.1)
    dispatch_floor = jax.jit(lambda h: h + 1)

    # 0. the port is faithful: agrees with the library, and with the original's recorded outputs
    worst_lib = check_port_against_library(lib, [(3, 5, None), (16, 50, 4), (4, 4, 3), (5, 2, 1)], rng)
    ref = check_port_against_reference()

    # 1. per-call latency
    cases = [  # (label, K, T, library order, port order; "n/a" where the original raises)
        ("K=3, T=5, order 4 (default)", 3, 5, None, None),
        ("K=16, T=50, order 4", 16, 50, 4, 4),
        ("K=16, T=50, order 49 (default)", 16, 50, None, "n/a"),
    ]
    latency_rows, k3_lib = [], {}
    for label, k, t, lib_order, port_order in cases:
        hist = make_histories(rng, 1, t, k)[0]
        dev_hist = jax.device_put(jnp.asarray(hist))
        components = list(hist.T)  # the original takes K 1-D tensors
        fns, number = {}, {}
        if k == 3:  # what any jitted call costs here: dispatch + one tiny kernel + sync
            fns["floor"] = functools.partial(dispatch_floor, dev_hist)
        for v in VARIANTS:
            fns[f"lib/{v}"] = functools.partial(lib[v], dev_hist, beta, accuracy_order=lib_order)
            if port_order != "n/a":
                fns[f"port/{v}"] = functools.partial(original_weights, components, 0.1, v, port_order)
        for name, fn in fns.items():
            fn()  # compile before sizing the rounds
            number[name] = calls_per_round(fn, round_seconds)
        timings = time_interleaved(fns, repeats=repeats, number=number, warmup=2, block_each=True)
        if "floor" in timings:
            floor = timings["floor"]
            floor_cells = [fmt_us(floor.median), fmt_us(floor.best), fmt_us(floor.cpu_median)]
            latency_rows.append([label, "(floor: `jit(h + 1)`)", *floor_cells, "", "", "", ""])
        for v in VARIANTS:
            lib_t = timings[f"lib/{v}"]
            if f"port/{v}" in timings:
                port_t = timings[f"port/{v}"]
                port_s, port_cpu = fmt_us(port_t.median), fmt_us(port_t.cpu_median)
                speedup = f"{port_t.median / lib_t.median:.1f}x"
                speedup_cpu = f"{port_t.cpu_median / lib_t.cpu_median:.1f}x"
            else:
                port_s, port_cpu, speedup, speedup_cpu = "n/a (original raises)", "", "-", "-"
            if k == 3:
                k3_lib[v] = lib_t.median
            lib_cells = [fmt_us(lib_t.median), fmt_us(lib_t.best), fmt_us(lib_t.cpu_median)]
            latency_rows.append([label, v, *lib_cells, port_s, port_cpu, speedup, speedup_cpu])

    # 2. batched throughput
    batch = make_histories(rng, args.batch, 5, 3)
    dev_batch = jax.device_put(jnp.asarray(batch))
    batched = {
        v: jax.jit(jax.vmap(functools.partial(softadapt_weights, variant=v), in_axes=(0, None)))
        for v in VARIANTS
    }
    for v in VARIANTS:  # the vmapped call computes what the per-history call does
        np.testing.assert_allclose(
            np.asarray(batched[v](dev_batch[:8], beta)),
            np.stack([np.asarray(lib[v](dev_batch[i], beta)) for i in range(8)]),
            rtol=1e-6,
            atol=1e-7,
        )
    fns = {v: functools.partial(batched[v], dev_batch, beta) for v in VARIANTS}
    for fn in fns.values():
        fn()
    number = max(1, calls_per_round(fns["original"], round_seconds * 2))
    timings = time_interleaved(fns, repeats=repeats, number=number, warmup=1, block_each=True)
    throughput_rows = []
    for v in VARIANTS:
        med = timings[v].median
        rate = args.batch / med
        verdict = "yes" if rate >= TARGET_THROUGHPUT else "NO"
        best_rate = args.batch / timings[v].best
        throughput_rows.append(
            [
                v,
                f"{args.batch:,}",
                f"{med * 1e3:.2f}",
                f"{rate / 1e6:.1f} M",
                f"{best_rate / 1e6:.1f} M",
                verdict,
            ]
        )

    # report
    print(f"## bench_weights{' (--quick)' if args.quick else ''}\n")
    print(machine + "\n")
    check = (
        f"Port check: agrees with the library to max |dw| = {worst_lib:.1e} (port float64, library float32)"
    )
    if ref:
        check += f"; matches the original's recorded outputs on {ref[0]} cases to max |dw| = {ref[1]:.1e}"
    print(check + ".\n")
    print(
        f"### Per-call latency (jitted, block_until_ready each call; median of {repeats} rounds; "
        "CPU = process CPU time per call)\n"
    )
    print(
        markdown_table(
            [
                "case",
                "variant",
                "library wall (µs)",
                "library wall best (µs)",
                "library CPU (µs)",
                "NumPy port of original, wall (µs)",
                "port CPU (µs)",
                "speedup (wall)",
                "speedup (CPU)",
            ],
            latency_rows,
            align="llrrrrrrr",
        )
    )
    target_us = ORIGINAL_US / TARGET_SPEEDUP
    print(
        f"\nTarget (K=3, T=5): >= {TARGET_SPEEDUP:.0f}x faster than the original's ~{ORIGINAL_US:.0f} µs, "
        f"i.e. <= {target_us:.2f} µs per call. Measured (median): "
        + ", ".join(
            f"{v} {fmt_us(t)} µs = {ORIGINAL_US / (t * 1e6):.0f}x "
            f"({'met' if t * 1e6 <= target_us else 'NOT met'})"
            for v, t in k3_lib.items()
        )
        + ".\n"
    )
    print(f"### Batched throughput (one jitted vmap call, K=3, T=5 histories; median of {repeats} rounds)\n")
    headers = [
        "variant",
        "histories",
        "median per call (ms)",
        "histories/s",
        "best-round histories/s",
        ">= 10 M/s",
    ]
    print(markdown_table(headers, throughput_rows, "lrrrrr"))


if __name__ == "__main__":
    main()
