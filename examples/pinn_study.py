"""The main demo: what loss balancing buys on physics-informed networks.

Trains one network per (method, seed) with the same budget, optimiser, initial
parameters and collocation points under fixed weights and under the library's
balancers, then reports for each method its per-seed relative L2 errors and the
seed-paired ratio of its error to fixed weights (geometric mean over seeds, with a
95% t interval on the log ratio): a method is called better or worse only where the
interval excludes 1. Figures: error against step (the curve), the losses and
weights over training, and the predicted against the reference solution.

Every run is one jitted program: the seeds of a method train together under
``vmap``, in chunks of ``lax.scan`` steps; fresh collocation points are drawn inside
the scan from a key carried in the state. The gradient-statistics balancers
(learning-rate annealing, gradient-norm, NTK weighting) compute their statistic only
on the steps their schedule recomputes: the scan runs blocks of ``update_every``
steps with the statistic step at its place, so nothing turns into a ``select``
under ``vmap``.

Set-ups (``--setup``, defaults of every other flag; ``--setup NAME --help`` shows them):

* ``demo`` (default): the Helmholtz benchmark exactly as Wang, Teng & Perdikaris (2021)
  set it up (``helmholtz_wang2021``: [2, 50, 50, 50, 1] tanh, standardised inputs, 128
  fresh points per term every step, Adam 1e-3 decayed by 0.9 every 1,000 steps, the
  four edges sharing one weight), at a fifth of the authors' budget (8,000 steps), fixed
  weights against learning-rate annealing, 3 seeds.
* ``wang2021``: the same at the authors' full budget, 40,001 steps, every balancer.
  ``--groups none`` gives each edge its own weight (K = 5).
* ``library``: the library's Burgers and Helmholtz with fresh points every step and the
  same learning-rate decay, 20,000 steps, every balancer.
* ``wave``: the NTK paper's 1-D wave equation (three weights), 20,000 steps.
* ``legacy``: the earlier study (Burgers, fixed points, no decay, 600 steps).

Run:

    python examples/pinn_study.py                      # the demo, about 3 minutes on 2 cores
    python examples/pinn_study.py --setup wang2021     # the authors' full budget
    python examples/pinn_study.py --setup wang2021 --methods fixed,lr_annealing --groups none
    python examples/pinn_study.py --setup library --problem helmholtz --steps 5000
    python examples/pinn_study.py --list-methods
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats as scipy_stats
from tqdm.auto import tqdm

import softadapt_jax as sj
from softadapt_jax import training
from softadapt_jax.balancers.base import recompute_due
from problems import PROBLEM_NAMES, Problem, get_problem

BalancerFactory = Callable[[int, "tuple[int, ...] | None"], sj.Balancer]

SETUPS: dict[str, dict[str, Any]] = {
    "demo": {
        "problem": "helmholtz_wang2021",
        "methods": "fixed,lr_annealing",
        "steps": 8000,
        "seeds": 3,
        "chunk": 500,
        "lr": 1e-3,
        "decay_rate": 0.9,
        "decay_steps": 1000,
        "groups": "problem",
    },
    "wang2021": {
        "problem": "helmholtz_wang2021",
        "methods": "all",
        "steps": 40_001,
        "seeds": 3,
        "chunk": 1000,
        "lr": 1e-3,
        "decay_rate": 0.9,
        "decay_steps": 1000,
        "groups": "problem",
    },
    "library": {
        "problem": "burgers,helmholtz",
        "methods": "all",
        "steps": 20_000,
        "seeds": 3,
        "chunk": 1000,
        "lr": 1e-3,
        "decay_rate": 0.9,
        "decay_steps": 1000,
        "groups": "none",
        "resample": True,
    },
    "wave": {
        "problem": "wave",
        "methods": "all",
        "steps": 20_000,
        "seeds": 3,
        "chunk": 1000,
        "lr": 1e-3,
        "decay_rate": 0.9,
        "decay_steps": 1000,
        "groups": "problem",
    },
    "legacy": {
        "problem": "burgers",
        "methods": "all",
        "steps": 600,
        "seeds": 2,
        "chunk": 100,
        "lr": 1e-3,
        "decay_rate": 1.0,
        "decay_steps": 1000,
        "groups": "none",
        "hidden": "64,64,64",
        "points": 1024,
        "resample": False,
    },
}
DEFAULT_SETUP = "demo"


def method_registry() -> dict[str, BalancerFactory]:
    """Every balancer of the library, with the settings the study uses (name -> factory of K, groups)."""
    from softadapt_jax import balancers as B

    def softadapt(variant: str, **kw: Any) -> BalancerFactory:
        # sum_to_k puts SoftAdapt on the scale of fixed weights (uniform = plain sum).
        return lambda k, g: B.softadapt_balancer(
            0.1, num_losses=k, variant=variant, window=5, sum_to_k=True, groups=g, **kw
        )

    registry: dict[str, BalancerFactory] = {
        "fixed": lambda k, g: B.fixed_balancer(num_losses=k, groups=g),
        "softadapt_original": softadapt("original"),
        "softadapt_normalized": softadapt("normalized"),
        "softadapt_loss_weighted": softadapt("loss_weighted"),
        "softadapt_log": lambda k, g: B.softadapt_balancer(
            10.0,
            num_losses=k,
            variant="original",
            window=5,
            scale="log",
            stencil="backward",
            sum_to_k=True,
            groups=g,
        ),
        "ratio_softadapt": lambda k, g: B.ratio_softadapt_balancer(num_losses=k, groups=g),
        "relobralo": lambda k, g: B.relobralo_balancer(num_losses=k, groups=g),
        "dwa": lambda k, g: B.dwa_balancer(num_losses=k, groups=g),
        "uncertainty": lambda k, g: B.uncertainty_balancer(num_losses=k, groups=g),
        "rlw": lambda k, g: B.rlw_balancer(num_losses=k, groups=g),
        # The authors' form (every 10 steps from step 0, after the step's update).
        "lr_annealing": lambda k, g: B.lr_annealing_balancer(num_losses=k, groups=g),
        "grad_norm": lambda k, g: B.inverse_grad_norm_balancer(num_losses=k, update_every=100, groups=g),
        "ntk": lambda k, g: B.ntk_balancer(num_losses=k, update_every=100, max_points=256, groups=g),
    }
    return registry


# --------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class PairedRatio:
    """Seed-paired ratio of a method's final error to fixed weights'.

    ``ratio`` is the geometric mean over seeds of ``err_method / err_fixed`` (same seed:
    same initial network and collocation points); ``low``/``high`` bound a t interval
    on the mean log ratio (``nan`` with fewer than 2 seeds or a non-finite error).
    """

    ratio: float
    low: float
    high: float
    verdict: str  # "better", "worse", "no clear difference", "n/a" or "diverged"


def paired_ratio(errors: np.ndarray, baseline: np.ndarray, level: float = 0.95) -> PairedRatio:
    """The seed-paired ratio of ``errors [S]`` to ``baseline [S]``, with its t interval.

    With S seeds the interval is ``exp(m ± t_{(1+level)/2, S-1} s / sqrt(S))`` for the
    mean ``m`` and standard deviation ``s`` of ``log(errors / baseline)``. A method is
    called better (worse) only where the whole interval lies below (above) 1.
    """
    errors, baseline = np.asarray(errors, np.float64), np.asarray(baseline, np.float64)
    if not (np.all(np.isfinite(errors)) and np.all(np.isfinite(baseline))):
        return PairedRatio(np.nan, np.nan, np.nan, "diverged")
    logs = np.log(errors) - np.log(baseline)
    mean = float(np.mean(logs))
    if logs.size < 2:
        return PairedRatio(float(np.exp(mean)), np.nan, np.nan, "n/a")
    half = float(scipy_stats.t.ppf(0.5 + level / 2, logs.size - 1)) * float(np.std(logs, ddof=1))
    half /= np.sqrt(logs.size)
    low, high = float(np.exp(mean - half)), float(np.exp(mean + half))
    verdict = "better" if high < 1 else "worse" if low > 1 else "no clear difference"
    return PairedRatio(float(np.exp(mean)), low, high, verdict)


def geometric_mean(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    return float(np.exp(np.mean(np.log(values)))) if np.all(values > 0) else float("nan")


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class MethodResult:
    """What one method produced over all seeds."""

    name: str
    errors: np.ndarray  # [seeds] final relative L2 errors
    curve_steps: np.ndarray  # [points] steps at which the error curve is taken (0 = initial)
    error_curve: np.ndarray  # [seeds, points]
    losses: np.ndarray  # [seeds, steps, K], every step
    weights: np.ndarray  # [seeds, steps, K], the weights used at every step
    step_time: float  # seconds per training step of all seeds together, compile excluded
    train_time: float  # seconds of training, all seeds together, compile excluded
    compile_time: float  # seconds compiling the chunk programs
    final_params: Any  # parameters of the first seed


@functools.lru_cache(maxsize=8)
def _seed_errors(problem: Problem) -> Callable[[Any], jax.Array]:
    """The jitted relative L2 error of every seed's parameters (one compile per problem)."""
    return jax.jit(jax.vmap(problem.relative_l2_error))


def _statistic_schedule(balancer: sj.Balancer) -> tuple[int, int] | None:
    """``(update_every, phase)`` of a gradient-statistics balancer, else ``None``.

    Derived from the balancer's own schedule (``recompute_due``): the statistic
    step of a block of ``update_every`` steps is the one at index ``phase``.
    """
    if balancer.statistic is None:
        return None
    sched = balancer.schedule
    if sched is None or sched.window != 1 or sched.accumulate != 1:
        raise ValueError(f"the study needs window=1 and accumulate=1, got the schedule {sched}")
    n = sched.update_every
    (phase,) = [c for c in range(n) if recompute_due(sched, c, 1, 0)]
    return n, phase


def make_segment(
    problem: Problem, balancer: sj.Balancer, start_phase: int, length: int
) -> Callable[[Any], tuple[Any, jax.Array, jax.Array]]:
    """``carry -> (carry, losses [length, K], weights [length, K])``: ``length`` training steps.

    ``carry`` is ``(train_state, point_stream)``. Each step takes its points from
    ``problem.next_points``. With a gradient-statistics ``schedule = (n, phase)``, the
    steps at which the balancer recomputes (``(start_phase + i) % n == phase``) run the
    step that computes the statistic and all others the plain step, laid out
    statically: the seeds are vmapped, and under vmap the step's own ``lax.cond`` would
    become a select computing the statistic at every step.
    """
    schedule = _statistic_schedule(balancer)
    plain, stat = (
        training.make_train_step(
            problem.loss_components, balancer=balancer, residuals_fn=problem.residuals, recompute=r
        )
        for r in (False, True)
    )

    def scan_steps(carry: Any, step: Callable, count: int) -> tuple[Any, tuple[jax.Array, jax.Array]]:
        def body(c: Any, _: Any) -> tuple[Any, tuple[jax.Array, jax.Array]]:
            state, stream = c
            batch, stream = problem.next_points(stream)
            state, metrics = step(state, batch)
            return (state, stream), (metrics["losses"], metrics["weights"])

        return jax.lax.scan(body, carry, None, length=count)

    def run_pattern(carry: Any, due: Sequence[bool]) -> tuple[Any, tuple[jax.Array, jax.Array]]:
        # Consecutive steps of the same kind become one scan.
        outs, i = [], 0
        while i < len(due):
            j = i
            while j < len(due) and due[j] == due[i]:
                j += 1
            carry, out = scan_steps(carry, stat if due[i] else plain, j - i)
            outs.append(out)
            i = j
        return carry, tuple(jnp.concatenate(parts) for parts in zip(*outs, strict=True))

    def segment(carry: Any) -> tuple[Any, jax.Array, jax.Array]:
        if schedule is None or schedule[0] == 1:
            carry, (losses, weights) = scan_steps(carry, plain if schedule is None else stat, length)
            return carry, losses, weights
        n, phase = schedule
        lead = (-start_phase) % n  # steps before the first whole block
        lead = min(lead, length)
        pieces = []
        if lead:
            carry, out = run_pattern(carry, [(start_phase + i) % n == phase for i in range(lead)])
            pieces.append(out)
        blocks, tail = divmod(length - lead, n)
        if blocks:
            block_due = [i == phase for i in range(n)]
            carry, (losses, weights) = jax.lax.scan(
                lambda c, _: run_pattern(c, block_due), carry, None, length=blocks
            )
            pieces.append((losses.reshape(-1, losses.shape[-1]), weights.reshape(-1, weights.shape[-1])))
        if tail:
            carry, out = run_pattern(carry, [i == phase for i in range(tail)])
            pieces.append(out)
        losses, weights = (jnp.concatenate(parts) for parts in zip(*pieces, strict=True))
        return carry, losses, weights

    return segment


def make_optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
    """Adam with the learning rate ``lr * decay_rate ** (step / decay_steps)`` (continuous decay).

    This is ``tf.train.exponential_decay(..., staircase=False)`` of the originals.
    """
    if args.decay_rate == 1.0:
        return optax.adam(args.lr)
    return optax.adam(
        optax.exponential_decay(args.lr, transition_steps=args.decay_steps, decay_rate=args.decay_rate)
    )


def train_method(
    problem: Problem,
    name: str,
    factory: BalancerFactory,
    args: argparse.Namespace,
    bar: tqdm,
    position: tuple[int, int],
) -> MethodResult:
    """Trains every seed of one method (vmapped) and returns its results."""
    groups = problem.term_groups if args.groups == "problem" else None
    balancer = factory(problem.num_losses, groups)
    tx = optax.chain(sj.balance(balancer), make_optimizer(args))
    # One key per seed, independent of how many seeds run: seed s is the same run in any study.
    keys = jnp.stack([jax.random.PRNGKey(args.seed0 + s) for s in range(args.seeds)])

    def init(key: jax.Array) -> tuple[Any, Any]:
        k_params, k_points = jax.random.split(key)
        state = training.BalancedTrainState.create(
            apply_fn=problem.predict, params=problem.init_params(k_params), tx=tx
        )
        return state, problem.init_points(k_points)

    carry = jax.jit(jax.vmap(init))(keys)
    schedule = _statistic_schedule(balancer)
    initial_error = np.asarray(_seed_errors(problem)(carry[0].params))

    compiled: dict[tuple[int, int], Any] = {}
    m, n_methods = position
    compile_time = 0.0

    def runner(start: int, length: int) -> Any:
        nonlocal compile_time
        key = ((start % schedule[0]) if schedule else 0, length)
        if key not in compiled:
            bar.set_description_str(f"compiling {name} ({m}/{n_methods})")
            segment = make_segment(problem, balancer, key[0], length)

            def chunk(c: Any) -> Any:
                c, losses, weights = jax.vmap(segment)(c)
                return c, losses, weights, jax.vmap(problem.relative_l2_error)(c[0].params)

            t0 = time.perf_counter()
            compiled[key] = jax.jit(chunk).lower(carry).compile()
            compile_time += time.perf_counter() - t0
            bar.set_description_str(f"training {name} ({m}/{n_methods})")
        return compiled[key]

    bounds = list(range(0, args.steps, args.chunk)) + [args.steps]
    losses, weights, curve, steps_at = [], [], [initial_error], [0]
    train_time = 0.0
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        fn = runner(start, stop - start)
        t0 = time.perf_counter()
        carry, chunk_losses, chunk_weights, err = fn(carry)
        err = np.asarray(jax.block_until_ready(err))
        train_time += time.perf_counter() - t0
        losses.append(np.asarray(chunk_losses))
        weights.append(np.asarray(chunk_weights))
        curve.append(err)
        steps_at.append(stop)
        bar.set_postfix_str(f"err={geometric_mean(err):.3g}")
        bar.update(stop - start)
    return MethodResult(
        name=name,
        errors=curve[-1],
        curve_steps=np.asarray(steps_at),
        error_curve=np.stack(curve, axis=1),
        losses=np.concatenate(losses, axis=1),
        weights=np.concatenate(weights, axis=1),
        step_time=train_time / args.steps,
        train_time=train_time,
        compile_time=compile_time,
        final_params=jax.tree.map(lambda x: x[0], carry[0].params),
    )


# --------------------------------------------------------------------------- reporting


def format_table(results: list[MethodResult]) -> str:
    """Markdown table: per-seed errors, geometric mean, paired ratio to fixed with interval, verdict."""
    fixed = next((r for r in results if r.name == "fixed"), None)
    lines = [
        "| method | rel. L2 error per seed | geometric mean | vs fixed (seed-paired) [95% CI] | verdict "
        "| ms/step | train s | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def key(r: MethodResult) -> float:
        g = geometric_mean(r.errors)
        return g if np.isfinite(g) else np.inf

    for r in sorted(results, key=key):
        per_seed = ", ".join(f"{e:.3g}" for e in r.errors)
        if fixed is None:
            ratio_text, verdict = "n/a", "n/a"
        elif r is fixed:
            ratio_text, verdict = "1", "baseline"
        else:
            pr = paired_ratio(r.errors, fixed.errors)
            interval = f" [{pr.low:.3g}, {pr.high:.3g}]" if np.isfinite(pr.low) else ""
            ratio_text, verdict = f"{pr.ratio:.3g}×{interval}", pr.verdict
        lines.append(
            f"| {r.name} | {per_seed} | {geometric_mean(r.errors):.3e} | {ratio_text} | {verdict} "
            f"| {1e3 * r.step_time:.2f} | {r.train_time:.1f} | {r.compile_time:.1f} |"
        )
    return "\n".join(lines)


def _downsample(steps: int, limit: int = 2000) -> np.ndarray:
    return np.unique(np.linspace(0, steps - 1, min(steps, limit)).astype(int))


def _main_methods(results: list[MethodResult], limit: int = 6) -> list[MethodResult]:
    """Fixed weights, learning-rate annealing and the best others, at most ``limit`` in all."""
    ranked = sorted(results, key=lambda r: np.nan_to_num(geometric_mean(r.errors), nan=np.inf))
    chosen = [r for r in results if r.name in ("fixed", "lr_annealing")]
    for r in ranked:
        if len(chosen) >= limit:
            break
        if r not in chosen:
            chosen.append(r)
    return chosen


def plot_error_curves(results: list[MethodResult], path: Path, title: str) -> Path:
    """Error against step of the main methods: geometric mean over seeds, band from best to worst seed."""
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 11})
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in _main_methods(results):
        curve = np.where(r.error_curve > 0, r.error_curve, np.nan)
        centre = np.exp(np.nanmean(np.log(curve), axis=0))
        (line,) = ax.semilogy(r.curve_steps, centre, lw=2, label=f"{r.name} ({geometric_mean(r.errors):.2e})")
        ax.fill_between(
            r.curve_steps, np.nanmin(curve, 0), np.nanmax(curve, 0), color=line.get_color(), alpha=0.2
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("relative L2 error")
    ax.set_title(f"{title}\n(line: geometric mean over seeds; band: best to worst seed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="method (final error)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_plots(problem: Problem, results: list[MethodResult], out: Path, title: str) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = [plot_error_curves(results, out / f"pinn_{problem.name}_error_curve.png", title)]

    # Losses and weights of seed 0 for every method.
    n = len(results)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, grid = plt.subplots(2 * rows, cols, figsize=(4.2 * cols, 6.0 * rows), sharex=True, squeeze=False)
    t = _downsample(results[0].losses.shape[1])
    for j, r in enumerate(results):
        loss_ax, weight_ax = grid[2 * (j // cols), j % cols], grid[2 * (j // cols) + 1, j % cols]
        for k, comp in enumerate(problem.component_names):
            loss_ax.semilogy(t + 1, r.losses[0, t, k], lw=0.8, label=comp)
            weight_ax.semilogy(t + 1, np.maximum(r.weights[0, t, k], 1e-12), lw=0.8, label=comp)
        loss_ax.set_title(f"{r.name}: err {geometric_mean(r.errors):.2e}", fontsize=11)
        loss_ax.set_ylabel("loss (seed 0)", fontsize=10)
        weight_ax.set_ylabel("weight", fontsize=10)
        weight_ax.set_xlabel("step", fontsize=10)
        for ax in (loss_ax, weight_ax):
            ax.tick_params(labelsize=9)
    for j in range(n, rows * cols):
        grid[2 * (j // cols), j % cols].axis("off")
        grid[2 * (j // cols) + 1, j % cols].axis("off")
    grid[0, 0].legend(fontsize=9)
    fig.suptitle(f"{title}:\nloss components and weights over training", fontsize=12)
    fig.tight_layout()
    paths.append(out / f"pinn_{problem.name}_training.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # Reference against the predictions of fixed weights and the best method (seed 0).
    points, u_ref = problem.reference()
    axis_names = ("x", "y") if problem.name.startswith("helmholtz") else ("x", "t")
    first, second = np.unique(points[:, 0]), np.unique(points[:, 1])
    on_grid = first.size * second.size == u_ref.size

    def show(ax: Any, values: np.ndarray, label: str, **kw: Any) -> None:
        if on_grid:
            image = ax.pcolormesh(
                first, second, values.reshape(first.size, second.size).T, shading="auto", **kw
            )
        else:
            image = ax.scatter(points[:, 0], points[:, 1], c=values, s=2, **kw)
        ax.set_title(label)
        ax.set_xlabel(axis_names[0])
        ax.set_ylabel(axis_names[1])
        fig.colorbar(image, ax=ax)

    best = min(results, key=lambda r: np.nan_to_num(geometric_mean(r.errors), nan=np.inf))
    shown = [r for r in results if r.name == "fixed"] + ([best] if best.name != "fixed" else [])
    fig, axes = plt.subplots(1, 1 + 2 * len(shown), figsize=(4.4 * (1 + 2 * len(shown)), 3.8), squeeze=False)
    axes = axes[0]
    limit = float(np.max(np.abs(u_ref)))
    signed = {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit}
    show(axes[0], u_ref, "reference", **signed)
    preds = [np.asarray(problem.predict(r.final_params, jnp.asarray(points, jnp.float32))) for r in shown]
    # One colour scale for every |error| panel, so the panels compare.
    error_max = max(float(np.max(np.abs(p - u_ref))) for p in preds)
    for i, (r, pred) in enumerate(zip(shown, preds, strict=True)):
        show(axes[1 + 2 * i], pred, f"{r.name} (seed 0)", **signed)
        show(
            axes[2 + 2 * i], np.abs(pred - u_ref), f"|error|, {r.name}", cmap="magma", vmin=0, vmax=error_max
        )
    fig.tight_layout()
    paths.append(out / f"pinn_{problem.name}_solution.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- command line


def _build_parser(setup: str) -> argparse.ArgumentParser:
    preset = SETUPS[setup]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"Set-ups: {', '.join(SETUPS)}; the defaults shown are those of --setup {setup}.",
    )
    parser.add_argument("--setup", default=setup, choices=list(SETUPS), help="preset of every other default")
    parser.add_argument(
        "--problem",
        default=preset["problem"],
        help=f"comma-separated problems ({', '.join(PROBLEM_NAMES)}), or 'all'",
    )
    parser.add_argument("--methods", default=preset["methods"], help="comma-separated method names, or 'all'")
    parser.add_argument("--steps", type=int, default=preset["steps"], help="training steps per run")
    parser.add_argument(
        "--seeds", type=int, default=preset["seeds"], help="seeds per method (trained together)"
    )
    parser.add_argument("--seed0", type=int, default=0, help="first seed")
    parser.add_argument("--lr", type=float, default=preset["lr"], help="initial Adam learning rate")
    parser.add_argument(
        "--decay-rate",
        type=float,
        default=preset["decay_rate"],
        help="learning rate factor per --decay-steps, applied continuously (1 = constant)",
    )
    parser.add_argument(
        "--decay-steps", type=int, default=preset["decay_steps"], help="steps per decay factor"
    )
    parser.add_argument(
        "--groups",
        default=preset["groups"],
        choices=["problem", "none"],
        help="'problem': terms the paper weights together share one weight (the authors' Helmholtz: "
        "K = 2); 'none': one weight per term",
    )
    parser.add_argument(
        "--chunk", type=int, default=preset["chunk"], help="steps per jitted chunk (error curve)"
    )
    parser.add_argument(
        "--hidden",
        default=preset.get("hidden"),
        help="hidden layer widths, e.g. 64,64,64 (default %(default)s: the problem's own)",
    )
    parser.add_argument(
        "--points",
        type=int,
        default=preset.get("points"),
        help="residual collocation points (default %(default)s: the problem's own)",
    )
    parser.add_argument(
        "--resample",
        action=argparse.BooleanOptionalAction,
        default=preset.get("resample"),
        help="fresh collocation points every step (default %(default)s: the problem's own)",
    )
    parser.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        default=preset.get("standardize"),
        help="standardise the network inputs (default %(default)s: the problem's own)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    parser.add_argument("--list-methods", action="store_true", help="print the method names and exit")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="instead of training, merge the results files of several runs of one set-up (e.g. "
        "methods run in batches) into one table and error-curve figure in --out",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--setup", default=DEFAULT_SETUP)
    setup = pre.parse_known_args(argv)[0].setup
    if setup not in SETUPS:
        setup = DEFAULT_SETUP  # the full parser reports the bad choice
    parser = _build_parser(setup)
    args = parser.parse_args(argv)
    registry = method_registry()
    if args.list_methods:
        print("\n".join(registry))
        raise SystemExit(0)
    problems = (
        list(PROBLEM_NAMES)
        if args.problem == "all"
        else [p.strip() for p in args.problem.split(",") if p.strip()]
    )
    for p in problems or [args.problem]:
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
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if not 0 < args.decay_rate <= 1:
        parser.error(f"--decay-rate must be in (0, 1], got {args.decay_rate}")
    if args.decay_steps < 1:
        parser.error(f"--decay-steps must be >= 1, got {args.decay_steps}")
    if args.hidden is not None:
        try:
            args.hidden = tuple(int(w) for w in str(args.hidden).split(","))
        except ValueError:
            parser.error(f"--hidden must be comma-separated integers, got {args.hidden!r}")
        if not args.hidden or min(args.hidden) < 1:
            parser.error(f"--hidden widths must be >= 1, got {args.hidden}")
    if args.points is not None and args.points < 1:
        parser.error(f"--points must be >= 1, got {args.points}")
    return args


def problem_options(args: argparse.Namespace) -> dict[str, Any]:
    """The problem-factory keywords the flags set (the rest stay the problem's own)."""
    options = {
        "hidden": args.hidden,
        "num_residual": args.points,
        "resample": args.resample,
        "standardize_inputs": args.standardize,
    }
    return {k: v for k, v in options.items() if v is not None}


def describe(problem: Problem, args: argparse.Namespace) -> str:
    groups = problem.term_groups if args.groups == "problem" else None
    g = problem.num_losses if groups is None else len(set(groups))
    decay = (
        "constant"
        if args.decay_rate == 1.0
        else f"decayed by {args.decay_rate} every {args.decay_steps} steps (continuous)"
    )
    points = "fresh points every step" if problem.resample else "one fixed set of points"
    return (
        f"{problem.name} (K = {problem.num_losses} terms, {g} weights{f', groups {groups}' if groups else ''}): "
        f"{args.steps} steps, {args.seeds} seeds, Adam lr {args.lr} {decay}, {points}"
    )


def merge_results(paths: Sequence[Path], out: Path, plots: bool = True) -> list[MethodResult]:
    """One table (and error-curve figure) from the ``pinn_*_results.json`` of several runs.

    Methods are taken from the first file that has them. Every file must describe the same
    set-up; fixed weights, if in several files, must agree seed by seed (same seeds, same runs).
    """
    summaries = [json.loads(Path(p).read_text()) for p in paths]
    descriptions = {s["description"] for s in summaries}
    if len(descriptions) != 1:
        raise ValueError(f"the files describe different set-ups: {sorted(descriptions)}")
    results: dict[str, MethodResult] = {}
    for summary in summaries:
        for name, m in summary["methods"].items():
            errors = np.asarray(m["errors"])
            if name in results:
                if name == "fixed" and not np.allclose(results[name].errors, errors, rtol=1e-6):
                    raise ValueError(
                        f"fixed weights differ between files: {results[name].errors} vs {errors}"
                    )
                continue
            results[name] = MethodResult(
                name=name,
                errors=errors,
                curve_steps=np.asarray(m["curve_steps"]),
                error_curve=np.asarray(m["error_curve"]),
                losses=None,
                weights=None,
                step_time=m["step_time_ms"] / 1e3,
                train_time=m["train_s"],
                compile_time=m["compile_s"],
                final_params=None,
            )
    merged = list(results.values())
    title = descriptions.pop()
    commands = "  \n".join(f"`{s['command']}` ({s['wall_s']:.0f} s)" for s in summaries)
    text = f"### {title}\n\nMerged from:  \n{commands}\n\n{format_table(merged)}\n"
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(paths[0]).name.removesuffix("_results.json")
    (out / f"{stem}_merged.md").write_text(text)
    if plots:
        print(
            f"saved {plot_error_curves(merged, out / f'{stem}_merged_error_curve.png', title.split(':')[0])}"
        )
    return merged


def main(argv: list[str] | None = None) -> dict[str, list[MethodResult]]:
    args = parse_args(argv)
    if args.merge:
        return {"merged": merge_results(args.merge, args.out, plots=not args.no_plots)}
    registry = method_registry()
    args.out.mkdir(parents=True, exist_ok=True)
    all_results: dict[str, list[MethodResult]] = {}
    shown_argv = sys.argv[1:] if argv is None else argv
    command = ("python examples/pinn_study.py " + " ".join(shown_argv)).strip()
    for pname in args.problems:
        problem = get_problem(pname, **problem_options(args))
        problem.reference()  # build the reference before timing anything
        results = []
        n = len(args.method_names)
        started = time.perf_counter()
        with tqdm(total=n * args.steps, desc=pname, unit="step", dynamic_ncols=True) as bar:
            for m, name in enumerate(args.method_names, start=1):
                results.append(train_method(problem, name, registry[name], args, bar, (m, n)))
        wall = time.perf_counter() - started
        load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        title = describe(problem, args)
        header = (
            f"### {title}\n\n"
            f"Command: `{command}`  \n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"jax {jax.__version__}; {datetime.datetime.now().isoformat(timespec='minutes')}; "
            f"wall time {wall:.0f} s for {n} methods x {args.seeds} seeds; "
            f"load average at the end {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}\n\n"
            "Seeds of a method train together (vmap): ms/step and train s are for all seeds at once. "
            "'vs fixed' is the geometric mean over seeds of error / fixed weights' error on the same "
            "seed, with a 95% t interval; 'better'/'worse' only where the interval excludes 1.\n"
        )
        table = format_table(results)
        print("\n" + header + "\n" + table + "\n")
        (args.out / f"pinn_{pname}_results.md").write_text(header + "\n" + table + "\n")
        fixed = next((r for r in results if r.name == "fixed"), None)
        summary = {
            "command": command,
            "description": title,
            "wall_s": wall,
            "methods": {
                r.name: {
                    "errors": r.errors.tolist(),
                    "geometric_mean": geometric_mean(r.errors),
                    "vs_fixed": (
                        dataclasses.asdict(paired_ratio(r.errors, fixed.errors))
                        if fixed is not None and r is not fixed
                        else None
                    ),
                    "step_time_ms": 1e3 * r.step_time,
                    "train_s": r.train_time,
                    "compile_s": r.compile_time,
                    "curve_steps": r.curve_steps.tolist(),
                    "error_curve": r.error_curve.tolist(),
                    "final_weights": r.weights[:, -1].tolist(),
                }
                for r in results
            },
        }
        (args.out / f"pinn_{pname}_results.json").write_text(json.dumps(summary, indent=1))
        if not args.no_plots:
            for path in save_plots(problem, results, args.out, title.split(":")[0]):
                print(f"saved {path}")
        all_results[pname] = results
    return all_results


if __name__ == "__main__":
    main()
