"""Cost of the gradient statistics on real PINN losses, against a plain gradient and the older forms.

Run from the repository root::

    /work/venv/bin/python benchmarks/bench_statistics.py          # ~2 min, loaded 2-core box
    /work/venv/bin/python benchmarks/bench_statistics.py --quick  # smoke test

A recompute step of learning-rate annealing and gradient-norm weighting needs
the K per-component gradients; one of NTK weighting needs the per-point
gradient norms of every residual term. This script times those computations
alone (jitted, no optimizer) on four losses:

* ``burgers`` and ``helmholtz``: the library's PINN problems
  (:mod:`problems` (examples/problems), default sizes), whose residual terms have
  their own forward passes, the PDE term through forward-mode derivatives;
* ``mlp_per_term`` and ``mlp_shared``: the MLP of ``bench_train_step.py`` with
  one forward pass per term, and with one forward pass over the concatenated
  points split into the terms.

Rows (time per call, and the ratio to ``grad``):

* ``grad``: ``jax.grad`` of the summed loss, the baseline;
* ``per_component``: the library's ``per_component_grads(vmap_vjps=False)``,
  as the train step uses it (K VJPs of one forward pass, constant one-hot
  cotangents);
* ``per_component_traced_eye``: the same loop with ``jnp.eye`` cotangents, the
  form before the fourth session (XLA cannot see their zeros);
* ``per_component_vmap``: ``per_component_grads()`` (the K VJPs batched with
  ``vmap``, the default for the gradient combiners);
* ``ntk``: the library's NTK statistic (one VJP per residual term, per point,
  under ``vmap``), 128 points per term;
* ``ntk_shared_vjp``: one VJP of all K terms per point and K one-hot
  cotangents, the form before the fourth session.

Every variant's result is checked against the library's before timing.
Interleaved rounds, median per call. Prints markdown and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax.gradients import per_component_grads
from softadapt_jax.statistics import compute_statistic

# The PINN problems live with the study, in examples/problems.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from problems import get_problem

try:  # python -m benchmarks.bench_statistics
    from benchmarks import bench_train_step as bts
    from benchmarks._timing import fmt_us, machine_info_markdown, markdown_table, time_interleaved
except ImportError:  # python benchmarks/bench_statistics.py: benchmarks/ is on sys.path
    import bench_train_step as bts
    from _timing import fmt_us, machine_info_markdown, markdown_table, time_interleaved

NTK_POINTS = 128
Case = tuple[Callable[..., jax.Array], Callable[..., Any], Any, Any]  # losses, residuals, params, batch


def cases() -> dict[str, Case]:
    out: dict[str, Case] = {}
    for name in ("burgers", "helmholtz"):
        problem = get_problem(name)
        params = problem.init_params(jax.random.key(0))
        batch = problem.sample_batch(jax.random.key(1))
        out[name] = (problem.loss_components, problem.residuals, params, batch)
    key_params, key_data = jax.random.split(jax.random.PRNGKey(0))
    params = bts.init_mlp(key_params)
    batch = bts.make_batch(key_data, 1024, 4)
    for layout, residuals in bts.RESIDUAL_LAYOUTS.items():
        terms = bts.Terms(residuals)
        out[f"mlp_{layout}"] = (terms.loss_components, residuals, params, batch)
    return out


def traced_eye_grads(loss_fn: Callable[..., jax.Array]) -> Callable[..., Any]:
    def grads(params: Any, batch: Any) -> Any:
        losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
        eye = jnp.eye(losses.shape[0], dtype=losses.dtype)
        rows = [vjp_fn(eye[i])[0] for i in range(losses.shape[0])]
        return jax.tree.map(lambda *g: jnp.stack(g), *rows)

    return grads


def shared_vjp_ntk(residuals_fn: Callable[..., Any], m: int) -> Callable[..., jax.Array]:
    def traces(params: Any, batch: Any) -> jax.Array:
        rows = jax.tree.map(lambda x: x[:m, None], batch)

        def point(row: Any) -> jax.Array:
            values, vjp_fn = jax.vjp(lambda p: tuple(residuals_fn(p, row)), params)
            norms = []
            for k in range(len(values)):
                ct = tuple(jnp.ones_like(v) if j == k else jnp.zeros_like(v) for j, v in enumerate(values))
                (g,) = vjp_fn(ct)
                norms.append(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(g)))
            return jnp.stack(norms)

        return jnp.mean(jax.vmap(point)(rows), axis=0)

    return traces


def variants(loss_fn: Callable[..., jax.Array], residuals_fn: Callable[..., Any], m: int) -> dict[str, Any]:
    return {
        "grad": lambda p, b: jax.grad(lambda q: jnp.sum(loss_fn(q, b)))(p),
        "per_component": lambda p, b: per_component_grads(loss_fn, vmap_vjps=False)(p, b)[1],
        "per_component_traced_eye": traced_eye_grads(loss_fn),
        "per_component_vmap": lambda p, b: per_component_grads(loss_fn)(p, b)[1],
        "ntk": lambda p, b: compute_statistic(
            "ntk_trace", loss_fn, p, b, residuals_fn=residuals_fn, max_points=m
        ),
        "ntk_shared_vjp": shared_vjp_ntk(residuals_fn, m),
    }


def _flat(tree: Any) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15, quick 3)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 15)
    machine = machine_info_markdown()

    rows = []
    for case, (loss_fn, residuals_fn, params, batch) in cases().items():
        m = min(NTK_POINTS, *(x.shape[0] for x in jax.tree.leaves(batch)))
        compiled = {
            name: jax.jit(fn).lower(params, batch).compile()
            for name, fn in variants(loss_fn, residuals_fn, m).items()
        }
        results = {name: c(params, batch) for name, c in compiled.items()}
        for name, reference in (
            ("per_component_traced_eye", "per_component"),
            ("per_component_vmap", "per_component"),
            ("ntk_shared_vjp", "ntk"),
        ):
            a, b = _flat(results[name]), _flat(results[reference])
            err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
            if err > 1e-4:
                raise AssertionError(f"{case}: {name} differs from {reference} by {err:.1e} (relative)")
        num_losses = int(jnp.shape(loss_fn(params, batch))[0])
        runners = {name: (lambda c=c, p=params, b=batch: c(p, b)) for name, c in compiled.items()}
        timings = time_interleaved(runners, repeats=repeats, number=5, warmup=1)
        base = timings["grad"].median
        for name, t in timings.items():
            rows.append([f"`{case}`", num_losses, f"`{name}`", fmt_us(t.median), f"{t.median / base:.2f}"])

    print(f"## bench_statistics{' (--quick)' if args.quick else ''}\n")
    print(machine + "\n")
    print(
        f"Median of {repeats} interleaved rounds of 5 calls per variant; NTK traces from {NTK_POINTS} "
        f"points per term. Every variant's result was checked against the library's (relative 1e-4).\n"
    )
    print(markdown_table(["loss", "K", "computation", "median (µs)", "/ grad"], rows, align="lrlrr"))


if __name__ == "__main__":
    main()
