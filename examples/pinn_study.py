"""The main demo: what loss balancing buys on physics-informed networks.

Trains the same tanh MLP with the same budget, optimizer and seeds on a PINN
problem under fixed equal weights and under every balancer the library holds,
then prints a table (final relative L2 error against the reference solution,
mean ± std over seeds; time per step) and saves plots of the loss components
and weights over training, and of the predicted versus the reference solution.

Seeds of a loss-statistics method train as one vmapped, jitted program (one
compile, one XLA program for all seeds). Gradient-statistics methods train
their seeds one after another with the same compiled step, because under
``vmap`` their ``lax.cond`` (per-component gradients only every n steps) would
turn into a ``select`` that pays for the gradients at every step.

Run (default: Burgers, every method, 2 seeds, 600 steps; about 4 minutes on 2 CPU cores):

    python examples/pinn_study.py
    python examples/pinn_study.py --problem helmholtz --steps 5000 --seeds 3
    python examples/pinn_study.py --methods fixed,softadapt_loss_weighted,relobralo --steps 200
    python examples/pinn_study.py --list-methods
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import softadapt_jax as sj
from softadapt_jax import training
from softadapt_jax.problems import PROBLEM_NAMES, Problem, get_problem

BalancerFactory = Callable[[int], sj.Balancer]


def method_registry() -> dict[str, BalancerFactory]:
    """Every balancer of the library, with the settings the study uses (name -> factory of K)."""
    from softadapt_jax import balancers as B

    def softadapt(variant: str, **kw: Any) -> BalancerFactory:
        # sum_to_k puts SoftAdapt on the scale of fixed weights (uniform = plain sum).
        return lambda k: B.softadapt_balancer(
            0.1, num_losses=k, variant=variant, window=5, sum_to_k=True, **kw
        )

    registry: dict[str, BalancerFactory] = {
        "fixed": lambda k: B.fixed_balancer(num_losses=k),
        "softadapt_original": softadapt("original"),
        "softadapt_normalized": softadapt("normalized"),
        "softadapt_loss_weighted": softadapt("loss_weighted"),
        "softadapt_log": lambda k: B.softadapt_balancer(
            10.0, num_losses=k, variant="original", window=5, scale="log", stencil="backward", sum_to_k=True
        ),
        "ratio_softadapt": lambda k: B.ratio_softadapt_balancer(num_losses=k),
        "relobralo": lambda k: B.relobralo_balancer(num_losses=k),
        "dwa": lambda k: B.dwa_balancer(num_losses=k),
        "uncertainty": lambda k: B.uncertainty_balancer(num_losses=k),
        "rlw": lambda k: B.rlw_balancer(num_losses=k),
        "lr_annealing": lambda k: B.lr_annealing_balancer(num_losses=k, update_every=10),
        "grad_norm": lambda k: B.grad_norm_balancer(num_losses=k, update_every=100),
        "ntk": lambda k: B.ntk_balancer(num_losses=k, update_every=100, max_points=256),
    }
    return registry


@dataclasses.dataclass
class MethodResult:
    """What one method produced over all seeds."""

    name: str
    errors: np.ndarray  # [seeds] final relative L2 errors
    error_curve: np.ndarray  # [seeds, chunks] error at the end of each chunk
    losses: np.ndarray  # [seeds, steps, K]
    weights: np.ndarray  # [seeds, steps, K]
    step_time: float  # seconds per step per seed, compile excluded
    compile_time: float
    final_params: Any  # parameters of the first seed


def make_chunk_runner(problem: Problem, tx: optax.GradientTransformation, chunk: int) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)`` running ``chunk`` steps with ``lax.scan``."""
    step = training.make_train_step(problem.loss_components, residuals_fn=problem.residuals)

    def run(state: training.BalancedTrainState, batch: Any):
        def body(s, _):
            s, m = step(s, batch)
            return s, (m["losses"], m["weights"])

        state, (losses, weights) = jax.lax.scan(body, state, None, length=chunk)
        return state, losses, weights, problem.relative_l2_error(state.params)

    return run


def train_method(
    problem: Problem, name: str, factory: BalancerFactory, args: argparse.Namespace, bar: tqdm
) -> MethodResult:
    balancer = factory(problem.num_losses)
    tx = optax.chain(sj.balance(balancer), optax.adam(args.lr))
    keys = jax.random.split(jax.random.PRNGKey(args.seed0), args.seeds)

    def init(key: jax.Array):
        k_params, k_batch = jax.random.split(key)
        state = training.BalancedTrainState.create(
            apply_fn=problem.predict, params=problem.init_params(k_params), tx=tx
        )
        return state, problem.sample_batch(k_batch)

    run = make_chunk_runner(problem, tx, args.chunk)
    vmapped = balancer.statistic is None and args.seeds > 1
    if vmapped:
        states, batches = jax.vmap(init)(keys)
        runs = [(jax.jit(jax.vmap(run)), states, batches)]
    else:
        fn = jax.jit(run)
        runs = [(fn, *init(k)) for k in keys]

    n_chunks = args.steps // args.chunk
    outs: list[list[tuple]] = [[] for _ in runs]
    compile_time, run_time = 0.0, 0.0
    for r, (fn, state, batch) in enumerate(runs):
        for c in range(n_chunks):
            t0 = time.perf_counter()
            state, losses, weights, err = fn(state, batch)
            jax.block_until_ready(err)
            dt = time.perf_counter() - t0
            if r == 0 and c == 0:
                compile_time = dt  # includes the first chunk's run; accounted below
            else:
                run_time += dt
            outs[r].append((np.asarray(losses), np.asarray(weights), np.asarray(err)))
            bar.set_postfix_str(f"{name} err={float(np.mean(err)):.3g}")
            bar.update(args.chunk * (args.seeds if vmapped else 1))
        runs[r] = (fn, state, batch)

    timed_chunks = n_chunks * len(runs) - 1
    step_time = run_time / max(timed_chunks, 1) / args.chunk / (args.seeds if vmapped else 1)
    compile_time -= step_time * args.chunk * (args.seeds if vmapped else 1)
    if vmapped:
        losses = np.concatenate([o[0] for o in outs[0]], axis=1)
        weights = np.concatenate([o[1] for o in outs[0]], axis=1)
        curve = np.stack([o[2] for o in outs[0]], axis=1)
        first_params = jax.tree.map(lambda x: x[0], runs[0][1].params)
    else:
        losses = np.stack([np.concatenate([o[0] for o in seed], axis=0) for seed in outs])
        weights = np.stack([np.concatenate([o[1] for o in seed], axis=0) for seed in outs])
        curve = np.stack([np.stack([o[2] for o in seed]) for seed in outs])
        first_params = runs[0][1].params
    return MethodResult(name, curve[:, -1], curve, losses, weights, step_time, compile_time, first_params)


def format_table(problem: Problem, results: list[MethodResult]) -> str:
    fixed = next((r for r in results if r.name == "fixed"), None)
    lines = [
        "| method | rel. L2 error (mean ± std) | vs fixed | time/step (ms) |",
        "|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: float(np.mean(r.errors))):
        ratio = f"{np.mean(r.errors) / np.mean(fixed.errors):.2f}×" if fixed else "n/a"
        lines.append(
            f"| {r.name} | {np.mean(r.errors):.3e} ± {np.std(r.errors):.1e} | {ratio} "
            f"| {1e3 * r.step_time:.2f} |"
        )
    return "\n".join(lines)


def save_plots(problem: Problem, results: list[MethodResult], out: Path, steps: int) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    n = len(results)
    cols = min(5, n)
    rows = -(-n // cols)
    fig, grid = plt.subplots(2 * rows, cols, figsize=(3.4 * cols, 4.6 * rows), sharex=True, squeeze=False)
    t = np.arange(1, steps + 1)
    for j, r in enumerate(results):
        loss_ax, weight_ax = grid[2 * (j // cols), j % cols], grid[2 * (j // cols) + 1, j % cols]
        for k, comp in enumerate(problem.component_names):
            loss_ax.semilogy(t, r.losses[0, :, k], lw=0.7, label=comp)
            weight_ax.plot(t, r.weights[0, :, k], lw=0.7, label=comp)
        loss_ax.set_title(f"{r.name}: err {np.mean(r.errors):.2e}", fontsize=8)
        loss_ax.set_ylabel("losses (seed 0)", fontsize=7)
        weight_ax.set_ylabel("weights", fontsize=7)
        weight_ax.set_xlabel("step", fontsize=7)
        for ax in (loss_ax, weight_ax):
            ax.tick_params(labelsize=6)
    for j in range(n, rows * cols):
        grid[2 * (j // cols), j % cols].axis("off")
        grid[2 * (j // cols) + 1, j % cols].axis("off")
    axes = grid
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"{problem.name}: losses and weights over training")
    fig.tight_layout()
    paths.append(out / f"pinn_{problem.name}_training.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    points, u_ref = problem.reference()
    best = min(results, key=lambda r: float(np.mean(r.errors)))
    shown = [r for r in results if r.name == "fixed"] + ([best] if best.name != "fixed" else [])
    fig, axes = plt.subplots(1, 1 + 2 * len(shown), figsize=(4.2 * (1 + 2 * len(shown)), 3.6), squeeze=False)
    axes = axes[0]
    kw = {"c": u_ref, "s": 2, "cmap": "RdBu_r", "vmin": -np.max(np.abs(u_ref)), "vmax": np.max(np.abs(u_ref))}
    sc = axes[0].scatter(points[:, 0], points[:, 1], **kw)
    axes[0].set_title("reference")
    fig.colorbar(sc, ax=axes[0])
    for i, r in enumerate(shown):
        pred = np.asarray(problem.predict(r.final_params, jnp.asarray(points, jnp.float32)))
        kw["c"] = pred
        sc = axes[1 + 2 * i].scatter(points[:, 0], points[:, 1], **kw)
        axes[1 + 2 * i].set_title(f"{r.name} (seed 0)")
        fig.colorbar(sc, ax=axes[1 + 2 * i])
        sc = axes[2 + 2 * i].scatter(points[:, 0], points[:, 1], c=np.abs(pred - u_ref), s=2, cmap="magma")
        axes[2 + 2 * i].set_title(f"|error| {r.name}")
        fig.colorbar(sc, ax=axes[2 + 2 * i])
    for ax in axes:
        ax.set_xlabel("x")
        ax.set_ylabel("t" if problem.name == "burgers" else "y")
    fig.tight_layout()
    paths.append(out / f"pinn_{problem.name}_solution.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    registry = method_registry()
    parser = argparse.ArgumentParser(
        description="Compare loss balancers on PINN problems.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--problem", default="burgers", help=f"one of {', '.join(PROBLEM_NAMES)}, or 'all'")
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run (default 600)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per method (default 2)")
    parser.add_argument("--seed0", type=int, default=0, help="first PRNG seed (default 0)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--chunk", type=int, default=100, help="steps per jitted scan chunk (default 100)")
    parser.add_argument("--hidden", default="64,64,64", help="hidden layer widths (default 64,64,64)")
    parser.add_argument("--points", type=int, default=1024, help="residual collocation points (default 1024)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    parser.add_argument("--list-methods", action="store_true", help="print the method names and exit")
    args = parser.parse_args(argv)
    if args.list_methods:
        print("\n".join(registry))
        raise SystemExit(0)
    problems = list(PROBLEM_NAMES) if args.problem == "all" else [args.problem]
    for p in problems:
        if p not in PROBLEM_NAMES:
            parser.error(f"--problem {p!r} is not one of {', '.join(PROBLEM_NAMES)} or 'all'")
    args.problems = problems
    methods = (
        list(registry) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    )
    unknown = [m for m in methods if m not in registry]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown or '(empty)'}; known: {', '.join(registry)}")
    args.method_names = methods
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.chunk < 1:
        parser.error(f"--chunk must be >= 1, got {args.chunk}")
    if args.steps < args.chunk or args.steps % args.chunk:
        parser.error(f"--steps must be a positive multiple of --chunk={args.chunk}, got {args.steps}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    try:
        args.hidden = tuple(int(w) for w in args.hidden.split(","))
    except ValueError:
        parser.error(f"--hidden must be comma-separated integers, got {args.hidden!r}")
    if not args.hidden or min(args.hidden) < 1:
        parser.error(f"--hidden widths must be >= 1, got {args.hidden}")
    if args.points < 1:
        parser.error(f"--points must be >= 1, got {args.points}")
    return args


def main(argv: list[str] | None = None) -> dict[str, list[MethodResult]]:
    args = parse_args(argv)
    registry = method_registry()
    args.out.mkdir(parents=True, exist_ok=True)
    all_results: dict[str, list[MethodResult]] = {}
    command = "python examples/pinn_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for pname in args.problems:
        problem = get_problem(pname, hidden=args.hidden, num_residual=args.points)
        problem.reference()  # build the reference before timing anything
        total = len(args.method_names) * args.seeds * args.steps
        results = []
        with tqdm(total=total, desc=pname, unit="step", dynamic_ncols=True) as bar:
            for name in args.method_names:
                results.append(train_method(problem, name, registry[name], args, bar))
        table = format_table(problem, results)
        header = (
            f"### {pname} (K={problem.num_losses}): {args.steps} steps, {args.seeds} seeds, "
            f"Adam lr {args.lr}\n\n"
            f"Command: `{command.strip()}`  \n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__}, {datetime.date.today().isoformat()}\n"
        )
        print("\n" + header + "\n" + table + "\n")
        (args.out / f"pinn_{pname}_results.md").write_text(header + "\n" + table + "\n")
        summary = {
            r.name: {
                "errors": r.errors.tolist(),
                "step_time_ms": 1e3 * r.step_time,
                "compile_s": r.compile_time,
                "error_curve": r.error_curve.tolist(),
            }
            for r in results
        }
        (args.out / f"pinn_{pname}_results.json").write_text(json.dumps(summary, indent=1))
        if not args.no_plots:
            for path in save_plots(problem, results, args.out, args.steps):
                print(f"saved {path}")
        all_results[pname] = results
    return all_results


if __name__ == "__main__":
    main()
