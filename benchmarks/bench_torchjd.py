"""Our Jacobian aggregators against torchjd 0.18's, timed on the same float32 Jacobian (issue 18, item 5).

torch is no dependency of the project nor of CI, so this script runs in a venv of
its own (CPU torch is enough; the default Linux wheel also pulls the nvidia-*
packages, which do no harm)::

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch "torchjd[full]==0.18.0" numpy
    /work/torchvenv/bin/pip install jax==0.10.2 jaxlib==0.10.2 optax==0.2.8 flax==0.12.8 -e /work/main

``torchjd[full]`` brings every solver its aggregators import: quadprog through
qpsolvers (UPGrad, DualProj), cvxpy with CLARABEL and ECOS (CAGrad, Nash-MTL),
scipy (FairGrad). Run from the repository root, on an idle machine::

    /work/torchvenv/bin/python benchmarks/bench_torchjd.py                  # K = 2, 4, 8, 16; n = 8577, 1e5
    /work/torchvenv/bin/python benchmarks/bench_torchjd.py --quick          # smoke run: K = 2, 4; n = 8577
    /work/torchvenv/bin/python benchmarks/bench_torchjd.py --markdown t.md  # also write the table

Without torch or torchjd the script says so and exits with status 0; the test
suite never imports it.

Every aggregator class of ``torchjd.aggregation`` 0.18 is paired with the
registry's ``gradients.aggregator(name, **config)`` under the constructor
arguments of the reference file ``tests/data/torchjd_aggregators.json`` (the
exception is ``Constant(weights)``, a fixed ``w @ J`` that the registry does
not name). For each ``(K, n)`` one float32 Jacobian is drawn with NumPy and
handed to both sides:

* torchjd: ``aggregator(J)`` under ``torch.no_grad()``, with
  ``torch.set_num_threads(2)``;
* ours: the ``jax.jit``-compiled ``agg.update`` (compiled before timing),
  waited for with ``block_until_ready``.

Stateful methods (Nash-MTL, PCD, ExcessMTL, GradVac) carry their state from
call to call on both sides, as in training; the agreement check compares the
first call of a fresh instance with our first ``update`` from ``init``. Methods
that draw random numbers (PCGrad's and GradVac's permutations, GradDrop's
thresholds, Random's weights) draw differently on the two sides, so only their
shapes are compared ("random"); ours draws from one fixed key at every call.
Elsewhere the check reports the relative difference
``||ours - torchjd|| / ||torchjd||`` and flags it above float32 tolerance; a
flagged row also gives each side's distance from torchjd run in float64 on the
same Jacobian, to tell whose float32 arithmetic loses the digits. Disagreements
and failures (the side that raised) are listed, never hidden.

``--gramian`` adds, at every size, the Gramian ``J J^T`` alone (torch's
``J @ J.T`` against the jitted ``J @ J.T``): the first operation of every
Gramian-based method, so a floor for their times on each side; it is a
reference row, outside the goal. ``--jax-dispatch sync`` starts JAX with
``jax_cpu_enable_async_dispatch=False``, so that the calling thread runs each
call as torch does, instead of JAX's default hand-off of every call to a
worker thread; the setting is read once, when JAX starts its CPU client, so
the two modes are two runs.

Timing: interleaved rounds (rotating order), every call waited for, the median
per call over rounds; the ratio is the median over rounds of torchjd's time over
ours (above 1: ours is faster). The issue's goal is a ratio above 1 everywhere
and at least 10 at the PINN size n = 8,577; the closing summary lists the rows
that miss it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import statistics
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import torch
    import torchjd.aggregation as tjd
except ImportError as err:  # torch is not in the project's environments: skip, do not fail
    print(
        f"bench_torchjd: skipped, torch/torchjd are not importable ({err}). "
        "See this script's docstring for the venv that runs it."
    )
    sys.exit(0)

import jax
import jax.numpy as jnp

from softadapt_jax.gradients.aggregators import aggregator

try:  # python -m benchmarks.bench_torchjd
    from benchmarks._timing import (
        add_jax_dispatch_option,
        apply_jax_dispatch,
        calls_per_round,
        machine_info_markdown,
        markdown_table,
        time_interleaved,
    )
except ImportError:  # python benchmarks/bench_torchjd.py: benchmarks/ is on sys.path
    from _timing import (
        add_jax_dispatch_option,
        apply_jax_dispatch,
        calls_per_round,
        machine_info_markdown,
        markdown_table,
        time_interleaved,
    )

TORCHJD_VERSION = "0.18.0"
# Well above float32 rounding over sums of n products, well below what a wrong method gives.
RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Pair:
    """One torchjd aggregator and our registry entry for the same method and arguments.

    Attributes:
      label: the row's name (our registry name, with a variant in brackets).
      name, config: ``gradients.aggregator(name, **config)``; ``config`` may
        depend on K (Nash-MTL's ``n_tasks``), hence a function of K.
      torchjd: ``K -> torchjd aggregator instance`` (a fresh one per call).
      random: the method draws random numbers (compare shapes only).
      min_k: the smallest K the method accepts.
      ours: instead of the registry, ``K -> (J -> output)`` (the reference rows
        that are no aggregator, such as the Gramian alone).
    """

    label: str
    name: str
    config: Callable[[int], dict[str, Any]]
    torchjd: Callable[[int], Any]
    random: bool = False
    min_k: int = 2
    ours: Callable[[int], Callable[[jax.Array], jax.Array]] | None = None


def _no_config(k: int) -> dict[str, Any]:
    del k
    return {}


PAIRS: tuple[Pair, ...] = (
    Pair("mean", "mean", _no_config, lambda k: tjd.Mean()),
    Pair("sum", "sum", _no_config, lambda k: tjd.Sum()),
    Pair("upgrad", "upgrad", _no_config, lambda k: tjd.UPGrad()),
    Pair("dual_proj", "dual_proj", _no_config, lambda k: tjd.DualProj()),
    Pair("mgda", "mgda", lambda k: {"epsilon": 1e-3, "max_iters": 100}, lambda k: tjd.MGDA(1e-3, 100)),
    Pair("cagrad", "cagrad", lambda k: {"c": 0.5}, lambda k: tjd.CAGrad(c=0.5)),
    Pair("imtl_g", "imtl_g", _no_config, lambda k: tjd.IMTLG()),
    Pair("aligned_mtl", "aligned_mtl", _no_config, lambda k: tjd.AlignedMTL()),
    Pair(
        "aligned_mtl (rmse)",
        "aligned_mtl",
        lambda k: {"scale_mode": "rmse"},
        lambda k: tjd.AlignedMTL(scale_mode="rmse"),
    ),
    Pair("config", "config", _no_config, lambda k: tjd.ConFIG()),
    Pair("fairgrad", "fairgrad", lambda k: {"alpha": 1.0}, lambda k: tjd.FairGrad(alpha=1.0)),
    Pair(
        "trimmed_mean",
        "trimmed_mean",
        lambda k: {"trim_number": 1},
        lambda k: tjd.TrimmedMean(trim_number=1),
        min_k=3,
    ),
    Pair(
        "krum",
        "krum",
        lambda k: {"n_byzantine": 1, "n_selected": 1},
        lambda k: tjd.Krum(n_byzantine=1, n_selected=1),
        min_k=4,
    ),
    Pair(
        "nash_mtl",
        "nash_mtl",
        lambda k: {"n_tasks": k, "max_norm": 1.0, "update_weights_every": 1, "optim_niter": 20},
        lambda k: tjd.NashMTL(n_tasks=k, max_norm=1.0, update_weights_every=1, optim_niter=20),
    ),
    Pair(
        "pcd",
        "pcd",
        lambda k: {"tau": 0.02, "beta": 0.999, "eps": 1e-8},
        lambda k: tjd.PCD(tau=0.02, beta=0.999, eps=1e-8),
    ),
    Pair(
        "excess_mtl",
        "excess_mtl",
        lambda k: {"robust_step_size": 1.0, "n_warmup_steps": 0},
        lambda k: tjd.ExcessMTL(robust_step_size=1.0, n_warmup_steps=0),
    ),
    Pair("pcgrad", "pcgrad", _no_config, lambda k: tjd.PCGrad(), random=True),
    Pair(
        "gradvac",
        "gradvac",
        lambda k: {"beta": 0.5, "eps": 1e-8},
        lambda k: tjd.GradVac(beta=0.5, eps=1e-8),
        random=True,
    ),
    Pair("graddrop", "graddrop", _no_config, lambda k: tjd.GradDrop(), random=True),
    Pair("random", "random", _no_config, lambda k: tjd.Random(), random=True),
)

# The one operation every Gramian-based method starts with, alone on both sides (``--gramian``):
# torch's ``J @ J.T`` against the jitted ``J @ J.T``, which bounds what those methods can gain.
GRAMIAN = Pair(
    "J J^T (Gramian alone)",
    "gramian",
    _no_config,
    lambda k: lambda j: j @ j.T,
    ours=lambda k: lambda j: j @ j.T,
)


def jacobian(k: int, n: int, seed: int, row_scales: tuple[float, ...]) -> np.ndarray:
    """The float32 ``J [k, n]`` every method gets at this size: Gaussian rows times ``row_scales``.

    The scales cycle over the rows. PINN loss terms differ in gradient size by
    orders of magnitude (hence the default 1, 10, 0.1), which is also what the
    normalising methods (UPGrad's trace, ConFIG's unit rows) are there for.
    """
    rng = np.random.default_rng([seed, k, n])
    scales = np.asarray(row_scales, dtype=np.float64)[np.arange(k) % len(row_scales)]
    return (rng.standard_normal((k, n)) * scales[:, None]).astype(np.float32)


class TorchjdRunner:
    """torchjd's aggregator on ``J``: one instance across calls (stateful methods advance)."""

    def __init__(self, pair: Pair, jac: np.ndarray) -> None:
        self.agg = pair.torchjd(jac.shape[0])
        self.jac = torch.from_numpy(jac)

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.agg(self.jac)


class OursRunner:
    """Our jitted ``update`` on ``J``, compiled on construction; the state is carried between calls."""

    def __init__(self, pair: Pair, jac: np.ndarray) -> None:
        k, n = jac.shape
        self.jac = jnp.asarray(jac)
        if pair.ours is not None:
            fn = pair.ours(k)
            self.state = ()
            self.step = jax.jit(lambda j, state: (fn(j), state)).lower(self.jac, ()).compile()
            return
        agg = aggregator(pair.name, **pair.config(k))
        if agg.needs_losses:  # no torchjd method reads the losses: a mismatch in PAIRS
            raise ValueError(f"aggregator {pair.name!r} reads the losses, torchjd's does not.")
        key = jax.random.key(0) if agg.needs_key else None

        def step(j: jax.Array, state: Any) -> tuple[jax.Array, Any]:
            return agg.update(j, state, key=key)

        self.state = agg.init(k, n, jnp.float32)
        self.step = jax.jit(step).lower(self.jac, self.state).compile()

    def __call__(self) -> jax.Array:
        direction, self.state = self.step(self.jac, self.state)
        return direction


def relative_error(x: np.ndarray, ref: np.ndarray) -> float:
    """``||x - ref|| / ||ref||`` (the plain norm of the difference where ``ref`` is zero)."""
    scale = np.linalg.norm(ref)
    diff = np.linalg.norm(x - ref)
    return float(diff / scale) if scale > 0 else float(diff)


def agreement(pair: Pair, runners: dict[str, Any], jac: np.ndarray) -> tuple[str, bool]:
    """``(cell, ok)``: the first call of each fresh runner, ours against torchjd's.

    A difference above :data:`RTOL` is traced with torchjd in float64 on the
    same Jacobian: the cell then gives how far each float32 result is from it,
    which tells whose float32 arithmetic loses the digits.
    """
    theirs = runners["torchjd"]().numpy().astype(np.float64)
    ours = np.asarray(runners["ours"](), dtype=np.float64)
    if ours.shape != theirs.shape:
        return f"shapes {ours.shape} vs {theirs.shape}", False
    if pair.random:
        return "random (shapes agree)", True
    if not (np.all(np.isfinite(ours)) and np.all(np.isfinite(theirs))):
        same = np.array_equal(np.isnan(ours), np.isnan(theirs))
        return ("non-finite on both" if same else "non-finite on one side"), same
    rel = relative_error(ours, theirs)
    if rel <= RTOL:
        return f"{rel:.1e}", True
    ref = TorchjdRunner(pair, jac.astype(np.float64))().numpy()
    return (
        f"{rel:.1e}; from torchjd in float64: ours {relative_error(ours, ref):.1e}, "
        f"torchjd {relative_error(theirs, ref):.1e}"
    ), False


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with 3 significant digits."""
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def median_ratio(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Median over rounds of ``a / b`` (rounds are interleaved, so each ratio sees the same load)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def raised_by(err: BaseException) -> str:
    """``"torchjd"`` if the traceback of ``err`` goes through torch or torchjd, else ``"ours"``."""
    frames = traceback.extract_tb(err.__traceback__)
    return "torchjd" if any("/torch" in f.filename for f in frames) else "ours"


def row_for(pair: Pair, jac: np.ndarray, repeats: int, round_s: float) -> dict[str, Any]:
    """The table row of ``pair`` at ``(k, n)``: the agreement check, both times and their ratio.

    The runners' first calls are the agreement check; the timed calls go on
    from there (stateful methods keep advancing).
    """
    k, n = jac.shape
    row: dict[str, Any] = {"method": pair.label, "K": k, "n": n, "torchjd": "-", "ours": "-", "ratio": None}
    row["reference"] = pair.ours is not None
    try:
        runners = {"torchjd": TorchjdRunner(pair, jac), "ours": OursRunner(pair, jac)}
        row["agree"], row["ok"] = agreement(pair, runners, jac)
        number = {m: calls_per_round(fn, round_s) for m, fn in runners.items()}
        t = time_interleaved(runners, repeats=repeats, number=number, warmup=1, block_each=True)
    except Exception as err:  # a side that raises on this input: say so in the row, go on
        who = f"{raised_by(err)} raised {type(err).__name__}"
        if "agree" not in row:  # raised before any output to compare: a failure, not a disagreement
            row.update(agree=who, ok=True)
        row["error"] = f"{who}: {err}"
        return row
    ratio = median_ratio(t["torchjd"].samples, t["ours"].samples)
    row.update(torchjd=fmt_ms(t["torchjd"].median), ours=fmt_ms(t["ours"].median), ratio=ratio)
    return row


def summary(rows: list[dict[str, Any]], pinn_n: int) -> list[str]:
    """Lines naming every disagreement, every failure, and every row that misses the issue's goal."""
    lines = []
    for r in rows:
        where = f"{r['method']} K={r['K']} n={r['n']}"
        if not r["ok"]:
            lines.append(f"- disagreement: {where}: {r['agree']}")
        if r.get("error"):
            lines.append(f"- failed: {where}: {r['error']}")
        elif r["reference"]:
            continue
        elif r["ratio"] < 1.0:
            lines.append(f"- slower than torchjd: {where}: {r['ratio']:.2f}x")
        elif r["n"] == pinn_n and r["ratio"] < 10.0:
            lines.append(f"- under 10x at the PINN size: {where}: {r['ratio']:.1f}x")
    return lines or ["- every row agrees and meets the goal"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke run: K = 2, 4 at n = 8577, few short rounds")
    p.add_argument("--ks", default=None, help="comma-separated K (default 2,4,8,16; --quick 2,4)")
    p.add_argument("--dims", default=None, help="comma-separated n (default 8577,100000; --quick 8577)")
    p.add_argument("--names", default="all", help="comma-separated row labels or registry names, or 'all'")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15; --quick 3)")
    p.add_argument("--round-ms", type=float, default=None, help="target length of one round (200; quick 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Jacobians")
    p.add_argument("--row-scales", default="1,10,0.1", help="comma-separated scales cycled over the rows")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the table as markdown")
    p.add_argument("--gramian", action="store_true", help="add a row per size for the Gramian J J^T alone")
    add_jax_dispatch_option(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_jax_dispatch(args.jax_dispatch)
    ks = [int(x) for x in (args.ks or ("2,4" if args.quick else "2,4,8,16")).split(",")]
    dims = [int(x) for x in (args.dims or ("8577" if args.quick else "8577,100000")).split(",")]
    repeats = args.repeats or (3 if args.quick else 15)
    round_s = (args.round_ms or (20.0 if args.quick else 200.0)) / 1e3
    row_scales = tuple(float(x) for x in args.row_scales.split(","))
    wanted = None if args.names == "all" else set(args.names.split(","))
    pairs = [p for p in PAIRS if wanted is None or p.label in wanted or p.name in wanted]
    if args.gramian:
        pairs.insert(0, GRAMIAN)
    installed = importlib.metadata.version("torchjd")
    if installed != TORCHJD_VERSION:
        print(f"warning: torchjd {installed} is installed; the pairs are those of {TORCHJD_VERSION}")
    torch.set_num_threads(2)  # the setting; XLA's CPU client uses every core of the 2-core box

    rows = []
    for n in dims:
        for k in ks:
            jac = jacobian(k, n, args.seed, row_scales)
            for pair in pairs:
                if k >= pair.min_k:
                    rows.append(row_for(pair, jac, repeats, round_s))
                    r = rows[-1]
                    print(f"  {r['method']} K={k} n={n}: {r['torchjd']} / {r['ours']} ms", flush=True)

    headers = ["method", "K", "n", "torchjd ms", "ours ms", "ratio", "agreement"]
    table = markdown_table(
        headers,
        [
            [
                r["method"],
                r["K"],
                f"{r['n']:,}",
                r["torchjd"],
                r["ours"],
                "-" if r["ratio"] is None else f"{r['ratio']:.1f}x",
                r["agree"] + ("" if r["ok"] else " (DISAGREE)"),
            ]
            for r in rows
        ],
        align="lrrrrrl",
    )
    header = (
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), torchjd {installed}; "
        + f"JAX dispatch: {args.jax_dispatch}; "
        + machine_info_markdown()
    )
    notes = summary(rows, pinn_n=8577)
    text = "\n\n".join([header, table, "\n".join(notes)])
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"written to {args.markdown}")


if __name__ == "__main__":
    main()
