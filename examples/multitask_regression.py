"""Multi-task regression with conflicting tasks: every balancing method side by side.

A shared MLP backbone (8 -> 64 -> 64 -> 16, tanh) feeds K = 3 heads
(16 -> 32 -> 1). The synthetic targets conflict on purpose:

* task 0: ``sin(a.x)``;
* task 1: ``-sin(a.x) + 0.5 cos(b.x)``, pulling the shared features the
  opposite way;
* task 2: ``10 (c.x)^2 / d``, a different function on a 100x larger loss scale.

Methods: the plain sum, SoftAdapt (one backward pass, via
``softadapt_jax.softadapt`` and ``value_and_weighted_grad``), PCGrad, MGDA
(also with Sener & Koltun's ``"l2"`` and ``"loss+"`` gradient normalisations),
CAGrad (these on the backbone only, heads on the plain sum), GradNorm (on
the last backbone layer) and RotoGrad's three variants. All use Adam (1e-3) on
the network; RotoGrad's rotations and weights get their own Adam (5e-4, smaller,
as its authors advise). Prints the final per-task test MSE (mean over seeds)
and the time per step, measured after compilation.

Any Jacobian aggregator of the registry runs by name as ``agg:<name>``
(``agg:upgrad``, ``agg:nash_mtl``, ``agg:dual_proj``, ...; see
``softadapt_jax.gradients.aggregators.names()``), through the optax adapter
on the backbone, the heads on the plain sum.

    python examples/multitask_regression.py [--steps 1500] [--seeds 1] [--methods plain,mgda,agg:upgrad,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import softadapt_jax as sj
from softadapt_jax.flax.rotograd import (
    RotateOnly,
    RotoGrad,
    RotoGradNorm,
    create_rotograd_train_state,
    make_rotograd_train_step,
    rotograd_optimizer,
)
from softadapt_jax.gradients import aggregate, aggregator, cagrad, gradnorm, mgda, pcgrad, per_component_grads
from softadapt_jax.gradients.aggregators import names as aggregator_names

K = 3
D_IN, LATENT = 8, 16
N_TRAIN, N_TEST, BATCH = 4096, 2048, 256
CHUNK = 100  # steps per jitted lax.scan call (one progress-bar tick)
LR, ROT_LR = 1e-3, 5e-4
METHODS = (
    "plain",
    "softadapt",
    "pcgrad",
    "mgda",
    "mgda_l2",
    "mgda_loss+",
    "cagrad",
    "gradnorm",
    "rotate_only",
    "rotograd",
    "rotogradnorm",
)


# Registry aggregators this example can run: constructor arguments without a default, and the
# methods the optax adapter cannot drive (three batches per step; FAMO's post-step weight update;
# Krum needs K >= 4).
AGGREGATOR_CONFIG = {"cagrad": {"c": 0.5}, "fairgrad": {"alpha": 1.0}, "trimmed_mean": {"trim_number": 1}}
AGGREGATORS_UNSUPPORTED = {"modo", "sdmgrad", "famo", "krum"}


def aggregator_methods() -> list[str]:
    return [f"agg:{n}" for n in aggregator_names() if n not in AGGREGATORS_UNSUPPORTED]


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.tanh(nn.Dense(64)(x))
        h = nn.tanh(nn.Dense(64)(h))
        return nn.Dense(LATENT)(h)


class Head(nn.Module):
    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        return nn.Dense(1)(nn.tanh(nn.Dense(32)(z)))[..., 0]


class MultiTask(nn.Module):
    """The same backbone and heads, without rotations (for the non-RotoGrad methods)."""

    backbone: nn.Module
    heads: tuple[nn.Module, ...]

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        z = self.backbone(x)
        return [h(z) for h in self.heads]


def make_data(seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    a, b, c = (rng.normal(size=D_IN) / np.sqrt(D_IN) * 2 for _ in range(3))
    x = rng.normal(size=(N_TRAIN + N_TEST, D_IN)).astype(np.float32)
    y = np.stack(
        [np.sin(x @ a), -np.sin(x @ a) + 0.5 * np.cos(x @ b), 10.0 * (x @ c) ** 2 / D_IN], axis=1
    ) + 0.05 * rng.normal(size=(len(x), K))
    y = y.astype(np.float32)
    split = {"x_train": x[:N_TRAIN], "y_train": y[:N_TRAIN], "x_test": x[N_TRAIN:], "y_test": y[N_TRAIN:]}
    return {name: jnp.asarray(v) for name, v in split.items()}


def task_mse(preds: list[jax.Array], y: jax.Array) -> jax.Array:
    return jnp.stack([jnp.mean((p - y[:, k]) ** 2) for k, p in enumerate(preds)])


def shared_mask(params: Any) -> dict[str, bool]:
    return {key: key == "backbone" for key in params}


def build(method: str, seed: int) -> tuple[Any, Callable[..., Any], Callable[..., Any]]:
    """(initial state, step(state, x, y) -> (state, losses), predict(state, x) -> preds) for one method."""
    heads = tuple(Head() for _ in range(K))
    key = jax.random.PRNGKey(seed)
    x0 = jnp.zeros((1, D_IN))
    if method in ("rotate_only", "rotograd", "rotogradnorm"):
        cls = {"rotate_only": RotateOnly, "rotograd": RotoGrad, "rotogradnorm": RotoGradNorm}[method]
        extra = {"alpha": 1.5} if method == "rotogradnorm" else {}
        model = cls(Backbone(), heads, latent_size=LATENT, normalize_losses=True, **extra)
        params = model.init(key, x0)["params"]
        state = create_rotograd_train_state(
            model, params, rotograd_optimizer(optax.adam(LR), optax.adam(ROT_LR))
        )
        rstep = make_rotograd_train_step(model, task_mse)

        def step(state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
            state, metrics = rstep(state, x, y)
            return state, metrics["losses"]

        return state, step, lambda s, x: model.apply({"params": s.params}, x)

    model = MultiTask(Backbone(), heads)
    params = model.init(key, x0)["params"]

    def losses_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return task_mse(model.apply({"params": p}, x), y)

    if method == "plain":
        tx = optax.adam(LR)

        def grads_of(p: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
            losses, vjp = jax.vjp(lambda q: losses_fn(q, x, y), p)
            return losses, vjp(jnp.ones(K))[0]

    elif method == "softadapt":
        tx = optax.chain(sj.softadapt(0.1, num_losses=K, sum_to_k=True), optax.adam(LR))

        def grads_of(p: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
            (_, losses), grads = sj.value_and_weighted_grad(losses_fn)(sj.get_weights(opt_state), p, x, y)
            return losses, grads

    else:
        by_name = {
            f"agg:{n}": (
                lambda n=n: aggregate(
                    aggregator(n, **AGGREGATOR_CONFIG.get(n, {})), num_tasks=K, mask=shared_mask, seed=seed
                )
            )
            for n in aggregator_names()
        }
        combiner = {
            **by_name,
            "pcgrad": lambda: pcgrad(seed=seed, mask=shared_mask),
            "mgda": lambda: mgda(mask=shared_mask),
            "mgda_l2": lambda: mgda(normalization="l2", mask=shared_mask),
            "mgda_loss+": lambda: mgda(normalization="loss+", mask=shared_mask),
            "cagrad": lambda: cagrad(0.5, mask=shared_mask),
            "gradnorm": lambda: gradnorm(num_losses=K, layer="backbone/Dense_2", alpha=1.5),
        }[method]()
        tx = optax.chain(combiner, optax.adam(LR))

        def grads_of(p: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
            return per_component_grads(losses_fn)(p, x, y)

    def step(state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        p, opt_state = state
        losses, grads = grads_of(p, opt_state, x, y)
        updates, opt_state = tx.update(grads, opt_state, p, losses=losses)
        return (optax.apply_updates(p, updates), opt_state), losses

    return (params, tx.init(params)), step, lambda s, x: model.apply({"params": s[0]}, x)


def run(
    method: str, seed: int, steps: int, data: dict[str, jax.Array], bar: tqdm
) -> tuple[np.ndarray, float]:
    state, step, predict = build(method, seed)

    @jax.jit
    def chunk(state: Any, key: jax.Array) -> tuple[Any, jax.Array]:
        def body(state: Any, k: jax.Array) -> tuple[Any, jax.Array]:
            idx = jax.random.randint(k, (BATCH,), 0, N_TRAIN)
            return step(state, data["x_train"][idx], data["y_train"][idx])

        return jax.lax.scan(body, state, jax.random.split(key, CHUNK))

    key = jax.random.PRNGKey(1000 + seed)
    times = []
    for _ in range(steps // CHUNK):
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        state, _ = chunk(state, sub)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
        bar.update(CHUNK)
    test = task_mse(predict(state, data["x_test"]), data["y_test"])
    # The first chunk includes compilation: time the rest (or nothing, with a single chunk).
    per_step = float(np.median(times[1:])) / CHUNK if len(times) > 1 else float("nan")
    return np.asarray(test), per_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=1500, help=f"training steps, a positive multiple of {CHUNK}")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds to average over (>= 1)")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}, or registry aggregators as agg:<name> "
        f"({','.join(aggregator_methods())})",
    )
    args = p.parse_args(argv)
    if args.steps < CHUNK or args.steps % CHUNK:
        p.error(f"--steps must be a positive multiple of {CHUNK}, got {args.steps}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS) - set(aggregator_methods()))
    if unknown or not methods:
        p.error(
            f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)} "
            f"or {', '.join(aggregator_methods())}"
        )
    args.methods = methods
    return args


def main(argv: list[str] | None = None) -> dict[str, tuple[np.ndarray, float]]:
    args = parse_args(argv)
    results: dict[str, tuple[np.ndarray, float]] = {}
    total = len(args.methods) * args.seeds * args.steps
    with tqdm(total=total, desc="training", unit="step", file=sys.stdout, leave=False) as bar:
        for method in args.methods:
            losses, times = [], []
            for seed in range(args.seeds):
                bar.set_postfix_str(f"{method} seed {seed}")
                test, per_step = run(method, seed, args.steps, make_data(seed), bar)
                losses.append(test)
                times.append(per_step)
            # One chunk only (steps == CHUNK): its time includes compilation, so none is reported.
            timed = [t for t in times if np.isfinite(t)]
            results[method] = (np.mean(losses, axis=0), float(np.median(timed)) if timed else np.nan)
    header = " | ".join(f"task {k} MSE" for k in range(K))
    print(
        f"\nFinal test MSE (mean over {args.seeds} seed(s), {args.steps} steps), "
        f"time per step after compilation (nan: a single chunk of {CHUNK} steps, all of it compiling)\n"
    )
    print(f"| method | {header} | sum | ms/step |")
    print("|---" * (K + 3) + "|")
    for method, (test, per_step) in results.items():
        cells = " | ".join(f"{v:.4f}" for v in test)
        print(f"| {method} | {cells} | {test.sum():.4f} | {1e3 * per_step:.2f} |")
    return results


if __name__ == "__main__":
    main()
