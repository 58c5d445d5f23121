"""Cost of a balanced training step against a plain summed loss, every balancer side by side.

Run from the repository root::

    /work/venv/bin/python benchmarks/bench_train_step.py          # full run (~3 min, loaded 2-core box)
    /work/venv/bin/python benchmarks/bench_train_step.py --quick  # smoke test (~1.5 min)
    /work/venv/bin/python benchmarks/bench_train_step.py --methods sum,softadapt,grad_norm

The model is PINN-sized: an MLP 2 -> 64 -> 64 -> 64 -> 1 with tanh, a batch of
1024 points and K = 4 loss terms (MSEs against four different targets on the
four disjoint quarters of the batch, at scales 1, 10, 0.1 and 1; the batch is
the pytree ``(xs, ys)`` of the K slices, and every row computes the losses with
the same function). ``--residual-layout`` picks how that function computes
them: ``per_term`` (default) runs one forward pass per term on its own slice,
as PINN losses are written (a PDE residual and each boundary term on their own
point sets, as in :mod:`problems` (examples/problems)); ``shared`` runs one forward
pass over the concatenated slices and splits it into the terms. Every row is
one jitted train step followed by ``optax.adam(1e-3)``:

* ``sum``: ``jax.value_and_grad`` of ``sum_k L_k`` on a plain
  ``(params, opt_state)`` pair -- THE baseline (always run);
* ``sum_guarded``: the plain sum with the same step-level non-finite guard
  as the library's train step (``guard.all_finite`` of the loss and the
  gradients, ``guard.keep_if`` on ``(params, opt_state)``): the baseline for
  the guarded library rows, so that the guard's own cost is not charged to
  the balancers (``fixed_noguard`` is the library's fixed-weights step with
  ``guard=False``, against ``sum``);
* ``sum_state``: the same plain sum written with the structure of the library
  rows: a ``BalancedTrainState`` (no balancer, ``tx = adam``) and
  ``state.apply_gradients`` (shows what the train state itself costs);
* ``softadapt``: path (b), ``value_and_weighted_grad`` with the weights of the
  optimizer state (one backward pass) and ``softadapt`` in the chain;
* ``softadapt_per_component``: path (a), the K per-component gradients from
  ``jax.jacrev`` (one forward, K vectorised backward passes) combined by
  ``softadapt(per_component=True)``;
* every balancer of the library through the library's own Flax-free helper,
  ``jax.jit(training.make_train_step(loss_components, residuals_fn=...))`` on a
  ``BalancedTrainState.create(apply_fn=None, params=<plain pytree>,
  tx=optax.chain(balance(balancer), optax.adam(1e-3)))``: ``fixed`` (all-ones
  weights: the plain sum through the balancer machinery, the same-structure
  baseline), ``softadapt_{original,normalized,loss_weighted}``,
  ``ratio_softadapt``, ``relobralo``, ``dwa``, ``uncertainty``, ``rlw``
  (default settings, K = 4);
* the gradient-statistics balancers ``lr_annealing``, ``grad_norm`` and
  ``ntk`` with ``update_every=100`` through ``jax.jit(make_train_step(...,
  balancer=b))`` (one executable, the recompute decided on the device by a
  ``lax.cond``), and with ``update_every=1`` (rows ``*_every1``: the statistic
  on every step, so its own cost is visible), plus ``grad_norm_hold``
  (``update_every=10**9``: only the cond's hold branch ever runs, which
  isolates what a hold step costs against ``fixed``) and ``grad_norm_hold_wrapped`` (that hold
  step inside ``lax.cond(pred, hold, hold)``: what a conditional around the
  step does to its speed on this backend). ``ntk`` gets
  ``residuals_fn(params, batch) -> K arrays``, the per-point residuals
  ``sqrt(scale_k) * (u(x_k) - y_k)`` on the K slices, whose mean squares are
  the K loss terms (the loss function is built on it); row i of every slice is
  point i of every term, so it also works on a one-row batch, as the library's
  NTK statistic evaluates it (checked before timing). ``ntk`` rows use
  ``ntk_balancer``'s default ``max_points=128`` (half of each 256-point slice);
  the PINN study uses 256, which doubles the per-point part of a statistic step.

Timing design: every step is compiled (and the ``update_every=1`` rows
calibrated) first, then one warm-up call each, then ``--repeats`` interleaved
rounds (default 15, quick 3; at least 5 without ``--quick``; methods in
rotating order). In each round every method runs one chain of consecutive
dependent steps, waited for at its end with ``block_until_ready``, and the
per-step time of the round is the chain time / its length. The chain is
``--steps`` steps long (default 100), which must be a multiple of 100, the
``update_every`` of the gradient-statistics rows: a balancer with
``update_every = n`` recomputes on exactly one step in every n consecutive
ones, so every round of every n = 100 row contains exactly ``steps / 100``
recompute steps (one by default) wherever its chain starts, and its per-step
time is the fair average over recompute and hold steps (after timing, the
script checks that those rows' balancers counted every step and did
recompute). Rows with ``update_every = 1`` do the same work on every step, so
any chain length is fair for them: a row whose steps are too slow to run
``--steps`` of them in about 0.5 s runs a shorter chain (``ntk_every1``: one
step is ~1-2 s here; the lengths are printed above the table).

Reported per step: the median and best (fastest round) wall-clock time, the
median process CPU time (all threads; much less inflated than wall time when
other processes compete for the cores), and the ratios to ``sum`` and to
``fixed`` as the median of the per-round ratios (paired rounds cancel slow
drift of a shared machine), for wall and CPU time. Also printed: the extra
cost of a statistic step (``*_every1`` minus ``fixed``) and what it adds once
amortised over 100 steps.

Besides the IQR of the per-round ratios, the verdict lines give a
distribution-free 95% confidence interval for their median (binomial order
statistics); with 15 rounds it is wide, so the issue-8 rows are best measured
with many rounds, e.g.
``--methods sum,fixed,lr_annealing,grad_norm,ntk,grad_norm_hold,grad_norm_every1 --repeats 151``.

Targets: ``softadapt / sum <= 1.05``; the issue's requirement "average step
cost with n = 100 within 5% of the plain sum" for ``lr_annealing``,
``grad_norm`` and ``ntk`` (``ratio to sum <= 1.05``); the verdicts are printed
under the table. More rows are entries of :data:`METHODS`. The script prints
markdown and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import softadapt_jax as sj
from softadapt_jax import get_weights, softadapt, training, value_and_weighted_grad

try:  # python -m benchmarks.bench_train_step
    from benchmarks._timing import (
        add_jax_dispatch_option,
        apply_jax_dispatch,
        block,
        calls_per_round,
        fmt_us,
        machine_info_markdown,
        markdown_table,
        time_interleaved,
    )
except ImportError:  # python benchmarks/bench_train_step.py: benchmarks/ is on sys.path
    from _timing import (
        add_jax_dispatch_option,
        apply_jax_dispatch,
        block,
        calls_per_round,
        fmt_us,
        machine_info_markdown,
        markdown_table,
        time_interleaved,
    )

TARGET_RATIO = 1.05
BASELINE = "sum"
STRUCTURED_BASELINE = "fixed"
STAT_EVERY = 100  # update_every of the gradient-statistics rows the requirement is about
GRADIENT_STATISTICS = ("lr_annealing", "grad_norm", "ntk")
ROUND_BUDGET_S = 0.5  # an update_every=1 row whose steps are slower runs a shorter chain
# Paths whose step is the library's train step on a BalancedTrainState with a balancer.
BALANCER_PATHS = ("train_step", "wrapped_hold")


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table.

    Attributes:
      description: what the step does.
      path: ``"sum"`` (gradient of the plain sum on ``(params, opt_state)``),
        ``"sum_state"`` (the same with a ``BalancedTrainState``), ``"weighted"``
        (path (b): one backward pass of ``sum_k w_k L_k`` with ``get_weights``),
        ``"per_component"`` (path (a): stacked per-component gradients),
        ``"train_step"`` (``jax.jit(training.make_train_step)`` with
        ``balance(balancer)``) or ``"wrapped_hold"`` (the hold step,
        ``make_train_step(recompute=False)``, inside a ``lax.cond`` whose two
        branches are that same step: a probe of what the conditional itself
        does to the step's speed).
      transform: for ``"weighted"``/``"per_component"``: ``K -> optax transform``
        put before adam in an ``optax.chain``.
      balancer: for the paths in :data:`BALANCER_PATHS`: ``K -> Balancer``.
      update_every: how often the balancer recomputes its weights (for the table).
      guard: for the train-step paths: ``make_train_step(guard=...)``, the
        step-level non-finite guard (the library's default is on).
    """

    description: str
    path: str
    transform: Callable[[int], optax.GradientTransformation] | None = None
    balancer: Callable[[int], sj.Balancer] | None = None
    update_every: int = 1
    guard: bool = True


def _stat_rows(every: int, suffix: str, path: str = "train_step") -> dict[str, Method]:
    how = "jit(make_train_step(balancer=b)), on-device cond"
    return {
        f"lr_annealing{suffix}": Method(
            f"{how}, lr_annealing_balancer(update_every={every}) (grad_abs statistic)",
            path,
            balancer=lambda k: sj.lr_annealing_balancer(num_losses=k, update_every=every),
            update_every=every,
        ),
        f"grad_norm{suffix}": Method(
            f"{how}, inverse_grad_norm_balancer(update_every={every}) (grad_norm statistic)",
            path,
            balancer=lambda k: sj.inverse_grad_norm_balancer(num_losses=k, update_every=every),
            update_every=every,
        ),
        f"ntk{suffix}": Method(
            f"{how}, ntk_balancer(update_every={every}) (ntk_trace, 128 points/loss)",
            path,
            balancer=lambda k: sj.ntk_balancer(num_losses=k, update_every=every, max_points=128),
            update_every=every,
        ),
    }


def _softadapt_row(variant: str) -> Method:
    return Method(
        f"make_train_step, softadapt_balancer(variant={variant!r})",
        "train_step",
        balancer=lambda k: sj.softadapt_balancer(0.1, num_losses=k, variant=variant),
    )


METHODS: dict[str, Method] = {
    "sum": Method("plain sum: value_and_grad(sum_k L_k), (params, opt_state)", "sum"),
    "sum_state": Method("plain sum, BalancedTrainState + apply_gradients, tx = adam", "sum_state"),
    "sum_guarded": Method(
        "plain sum with the same non-finite guard (keep params/opt_state unless all finite)", "sum_guarded"
    ),
    "softadapt": Method(
        "SoftAdapt, path (b): value_and_weighted_grad (one backward pass)",
        "weighted",
        transform=lambda k: softadapt(0.1, num_losses=k),
    ),
    "softadapt_per_component": Method(
        "SoftAdapt, path (a): jacrev per-component grads, per_component=True",
        "per_component",
        transform=lambda k: softadapt(0.1, num_losses=k, per_component=True),
    ),
    "fixed": Method(
        "make_train_step, fixed_balancer() (all ones: plain sum, same structure)",
        "train_step",
        balancer=lambda k: sj.fixed_balancer(num_losses=k),
    ),
    "fixed_noguard": Method(
        "make_train_step(guard=False), fixed_balancer(): the same step without the non-finite guard",
        "train_step",
        balancer=lambda k: sj.fixed_balancer(num_losses=k),
        guard=False,
    ),
    "softadapt_original": _softadapt_row("original"),
    "softadapt_normalized": _softadapt_row("normalized"),
    "softadapt_loss_weighted": _softadapt_row("loss_weighted"),
    "ratio_softadapt": Method(
        "make_train_step, ratio_softadapt_balancer()",
        "train_step",
        balancer=lambda k: sj.ratio_softadapt_balancer(num_losses=k),
    ),
    "relobralo": Method(
        "make_train_step, relobralo_balancer()",
        "train_step",
        balancer=lambda k: sj.relobralo_balancer(num_losses=k),
    ),
    "dwa": Method(
        "make_train_step, dwa_balancer()",
        "train_step",
        balancer=lambda k: sj.dwa_balancer(num_losses=k),
    ),
    "uncertainty": Method(
        "make_train_step, uncertainty_balancer() (adam(1e-2) on log-variances)",
        "train_step",
        balancer=lambda k: sj.uncertainty_balancer(num_losses=k),
    ),
    "rlw": Method(
        "make_train_step, rlw_balancer()",
        "train_step",
        balancer=lambda k: sj.rlw_balancer(num_losses=k),
    ),
    **_stat_rows(STAT_EVERY, ""),
    **_stat_rows(1, "_every1"),
    # update_every larger than any run: only the hold step (no statistic) ever runs.
    "grad_norm_hold": Method(
        "jit(make_train_step), inverse_grad_norm_balancer(update_every=10**9): the cond's hold branch only",
        "train_step",
        balancer=lambda k: sj.inverse_grad_norm_balancer(
            num_losses=k, update_every=10**9, update_first=False
        ),
        update_every=10**9,
    ),
    "grad_norm_hold_wrapped": Method(
        "jit(lax.cond(pred, hold, hold)): the hold step in a conditional with two equal branches",
        "wrapped_hold",
        balancer=lambda k: sj.inverse_grad_norm_balancer(
            num_losses=k, update_every=10**9, update_first=False
        ),
        update_every=10**9,
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


Batch = tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]


def make_batch(key: jax.Array, batch: int, num_losses: int) -> Batch:
    """``(xs, ys)``: K slices ``x_k [batch/K, 2]`` with targets ``y_k``, a different function each.

    One pytree leaf per slice, so that row i of every leaf is point i of every
    loss term (the layout of PINN collocation sets that the NTK statistic's
    ``residuals_fn`` is evaluated on, one row at a time).
    """
    x = jax.random.uniform(key, (batch, 2), minval=-1.0, maxval=1.0)
    funcs = [
        lambda x: jnp.sin(np.pi * x[:, 0]) * jnp.cos(np.pi * x[:, 1]),
        lambda x: x[:, 0] ** 2 - x[:, 1],
        lambda x: jnp.zeros(x.shape[0]),
        lambda x: jnp.exp(-(x[:, 0] ** 2 + x[:, 1] ** 2)),
    ]
    xs = tuple(jnp.array_split(x, num_losses))
    return xs, tuple(funcs[k % len(funcs)](p) for k, p in enumerate(xs))


def _scaled(parts: list[jax.Array]) -> list[jax.Array]:
    return [np.sqrt(SCALES[k % len(SCALES)]) * r for k, r in enumerate(parts)]


def residuals_per_term(params: Any, batch: Batch) -> list[jax.Array]:
    """K arrays of per-point residuals ``sqrt(scale_k) * (u(x_k) - y_k)``: ``mean(r_k**2) = L_k``.

    One forward pass per term, on that term's own points: how PINN losses are
    written (a PDE residual and boundary terms on their own point sets, as in
    :mod:`problems` (examples/problems)).
    """
    xs, ys = batch
    return _scaled([mlp(params, x) - y for x, y in zip(xs, ys, strict=True)])


def residuals_shared(params: Any, batch: Batch) -> list[jax.Array]:
    """The same residuals from one forward pass over the concatenated slices, split back into K terms."""
    xs, ys = batch
    residual = mlp(params, jnp.concatenate(xs)) - jnp.concatenate(ys)
    return _scaled(jnp.split(residual, np.cumsum([len(y) for y in ys])[:-1]))


RESIDUAL_LAYOUTS: dict[str, Callable[[Any, Batch], list[jax.Array]]] = {
    "per_term": residuals_per_term,
    "shared": residuals_shared,
}


@dataclasses.dataclass(frozen=True)
class Terms:
    """The loss terms every row trains on, in one residual layout.

    Attributes:
      residuals: ``(params, batch) -> K`` per-point residual arrays (the NTK ``residuals_fn``).
      loss_components: ``(params, batch) -> [K]`` MSEs on the K disjoint slices of the
        batch, at scales 1, 10, 0.1, 1: the mean squares of ``residuals``.
    """

    residuals: Callable[[Any, Batch], list[jax.Array]]

    def loss_components(self, params: Any, batch: Batch) -> jax.Array:
        return jnp.stack([jnp.mean(r**2) for r in self.residuals(params, batch)])


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------


def make_runner(method: Method, terms: Terms, num_losses: int, params0: Any, batch: Batch, lr: float = 1e-3):
    """``(run_one, get_state)``: one compiled step advancing its own carried state, and a reader."""
    loss_components, residuals = terms.loss_components, terms.residuals
    if method.path in (*BALANCER_PATHS, "sum_state"):
        if method.path == "sum_state":
            tx = optax.adam(lr)

            def step(state, b):
                loss, grads = jax.value_and_grad(lambda p: jnp.sum(loss_components(p, b)))(state.params)
                return state.apply_gradients(grads=grads), {"loss": loss}

            step = jax.jit(step)
        else:
            balancer = method.balancer(num_losses)
            tx = optax.chain(sj.balance(balancer), optax.adam(lr))
        carry = [training.BalancedTrainState.create(apply_fn=None, params=params0, tx=tx)]
        if method.path == "train_step":
            step = jax.jit(
                training.make_train_step(
                    loss_components, balancer=balancer, residuals_fn=residuals, guard=method.guard
                )
            )
        elif method.path == "wrapped_hold":
            hold = training.make_train_step(
                loss_components, balancer=balancer, residuals_fn=residuals, recompute=False
            )
            # The predicate is data (never true in a benchmark run), so XLA keeps the conditional.
            step = jax.jit(lambda state, b: jax.lax.cond(state.step < 2**30, hold, hold, state, b))

        def run_one():
            carry[0], metrics = step(carry[0], batch)
            return carry[0], metrics

        run_one.kernels = lambda: count_kernels(step, carry[0], batch)
        return run_one, lambda: carry[0]

    adam = optax.adam(lr)
    tx = adam if method.transform is None else optax.chain(method.transform(num_losses), adam)

    def raw_step(params, opt_state, batch):
        if method.path in ("sum", "sum_guarded"):
            loss, grads = jax.value_and_grad(lambda p: jnp.sum(loss_components(p, batch)))(params)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            if method.path == "sum_guarded":
                ok = sj.guard.all_finite(loss, grads)
                stepped = (optax.apply_updates(params, updates), new_opt_state)
                new = sj.guard.keep_if(ok, stepped, (params, opt_state))
                return (*new, loss)
            opt_state = new_opt_state
        elif method.path == "weighted":
            weighted = value_and_weighted_grad(loss_components)
            (loss, losses), grads = weighted(get_weights(opt_state), params, batch)
            updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
        elif method.path == "per_component":

            def with_aux(p):
                losses = loss_components(p, batch)
                return losses, losses

            per_component, losses = jax.jacrev(with_aux, has_aux=True)(params)  # leaves [K, ...]
            loss = jnp.dot(get_weights(opt_state), losses)
            updates, opt_state = tx.update(per_component, opt_state, params, losses=losses)
        else:
            raise ValueError(f"unknown gradient path {method.path!r}")
        return optax.apply_updates(params, updates), opt_state, loss

    jstep = jax.jit(raw_step)
    carry = [params0, tx.init(params0)]

    def run_one():
        params, opt_state, loss = jstep(carry[0], carry[1], batch)
        carry[0], carry[1] = params, opt_state
        return params, opt_state, loss

    run_one.kernels = lambda: count_kernels(jstep, carry[0], carry[1], batch)
    return run_one, lambda: tuple(carry)


# Instructions of a compiled computation that launch no work of their own.
_NOT_KERNELS = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def _hlo_computations(text: str) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """``({name: [(opcode, line)]}, entry name)`` of an optimized HLO module's text."""
    comps: dict[str, list[tuple[str, str]]] = {}
    entry, current = "", None
    for line in text.split("\n"):
        head = re.match(r"(ENTRY )?%([\w.-]+) .*\{$", line)
        if head and " = " not in line:
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            rhs = line.split(" = ", 1)[1]
            if rhs.startswith("("):  # a tuple shape, which holds spaces: skip to its closing bracket
                depth = 0
                for i, ch in enumerate(rhs):
                    depth += {"(": 1, ")": -1}.get(ch, 0)
                    if depth == 0:
                        rhs = rhs[i + 1 :]
                        break
            else:
                rhs = rhs.split(" ", 1)[1]
            comps[current].append((rhs.strip().split("(", 1)[0], line))
    return comps, entry


def count_kernels(jitted: Callable[..., Any], *args: Any) -> int:
    """Operations the compiled ``jitted(*args)`` launches on a step that computes no statistic.

    On the CPU backend every fusion, dot, copy or custom call is one task with
    a fixed launch cost, independent of its size. A conditional counts one
    plus its shortest branch (the step without the statistic).
    """
    comps, entry = _hlo_computations(jitted.lower(*args).compile().as_text())

    def count(name: str) -> int:
        total = 0
        for op, line in comps[name]:
            if op == "conditional":
                listed = re.search(r"branch_computations=\{([^}]*)\}", line)
                pairs = re.findall(r"(?:true|false)_computation=%([\w.-]+)", line)
                names = [b.strip().lstrip("%") for b in listed.group(1).split(",")] if listed else pairs
                total += 1 + min((count(b) for b in names), default=0)
            elif op not in _NOT_KERNELS:
                total += 1
        return total

    return count(entry)


def check_paths_agree(terms: Terms, num_losses: int, params: Any, batch: Batch, steps: int = 8) -> float:
    """Paths (a) and (b) give the same parameters (the benchmark compares equal computations)."""
    results = []
    for name in ("softadapt", "softadapt_per_component"):
        run_one, get = make_runner(METHODS[name], terms, num_losses, params, batch)
        for _ in range(steps):
            run_one()
        results.append(get()[0])
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), *results)
    worst = max(jax.tree.leaves(diffs))
    if worst > 1e-4:
        raise AssertionError(f"paths (a) and (b) disagree by {worst:.2e} after {steps} steps")
    return worst


def check_residuals(residuals: Callable[[Any, Batch], list[jax.Array]], params: Any, batch: Batch) -> float:
    """``residuals_fn`` works one row at a time and reproduces the loss terms point by point."""
    whole = residuals(params, batch)
    one_row = [residuals(params, jax.tree.map(lambda a, i=i: a[i : i + 1], batch)) for i in range(3)]
    worst = 0.0
    for i, rows in enumerate(one_row):
        for k, r in enumerate(rows):
            if r.shape != (1,):
                raise AssertionError(f"residuals_fn on one row gives shape {r.shape} for term {k}")
            worst = max(worst, float(jnp.abs(r[0] - whole[k][i])))
    if worst > 1e-5:
        raise AssertionError(f"residuals_fn row by row differs from the batch by {worst:.1e}")
    return worst


def check_recomputed(name: str, state: Any) -> None:
    """A gradient-statistics row must have recomputed its weights (the statistic branch ran)."""
    (bstate,) = sj.find_balancer_states(state.opt_state)
    if int(bstate.count) != int(state.step) or int(bstate.rejected):
        raise AssertionError(f"{name}: balancer counted {int(bstate.count)} of {int(state.step)} steps")
    if np.allclose(np.asarray(bstate.method_state.ema), 1.0):
        raise AssertionError(f"{name}: weights never left their initial value; the statistic never ran")


def check_held(name: str, state: Any) -> None:
    """A hold-only row must never have computed the statistic (its weights are still all ones)."""
    (bstate,) = sj.find_balancer_states(state.opt_state)
    if int(bstate.count) != int(state.step) or not np.all(np.asarray(bstate.method_state.ema) == 1.0):
        raise AssertionError(f"{name}: the statistic ran; this row must time hold steps only")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def _fmt_every(method: Method) -> str:
    if method.path not in BALANCER_PATHS:
        return ""
    return "never" if method.update_every >= 10**9 else str(method.update_every)


def _median_ratio(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return float(np.median([x / y for x, y in zip(a, b, strict=True)]))


def _ratio_iqr(a: tuple[float, ...], b: tuple[float, ...]) -> str:
    """The interquartile range of the per-round ratios, e.g. ``[0.98, 1.07]``."""
    q1, q3 = np.percentile([x / y for x, y in zip(a, b, strict=True)], [25, 75])
    return f"[{q1:.2f}, {q3:.2f}]"


def _median_ci(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float]:
    """A distribution-free 95% confidence interval for the median of the per-round ratios.

    The order statistics ``n/2 -+ 1.96 sqrt(n)/2`` of the sorted ratios (the
    binomial interval for a median): no assumption on the shape of the
    round-to-round noise, which on a shared machine is skewed.
    """
    r = np.sort([x / y for x, y in zip(a, b, strict=True)])
    n = len(r)
    half = 1.96 * np.sqrt(n) / 2
    lo, hi = int(np.floor(n / 2 - half)), int(np.ceil(n / 2 + half)) - 1
    return float(r[max(lo, 0)]), float(r[min(hi, n - 1)])


def run_processes(args: argparse.Namespace) -> None:
    """Runs the benchmark in ``args.processes`` fresh processes; prints the spread of their ratios.

    Each process compiles its own steps, and where XLA places their buffers
    and code differs from process to process: a ratio measured in one process
    carries a per-process offset of a few percent that more rounds do not
    remove. The median over processes of the per-process median ratios does.
    """
    machine = machine_info_markdown()
    forwarded = [a for a in sys.argv[1:] if not a.startswith("--processes")]
    if "--processes" in sys.argv[1:]:  # "--processes N" as two tokens
        i = sys.argv.index("--processes")
        forwarded = sys.argv[1:i] + sys.argv[i + 2 :]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            path = os.path.join(tmp, f"run{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--json", path]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(path) as f:
                results.append(json.load(f))
            print(f"process {i + 1}/{args.processes} done", file=sys.stderr, flush=True)
    names = list(results[0]["methods"])
    keys = [
        ("wall_sum", "wall / sum"),
        ("cpu_sum", "CPU / sum"),
        ("wall_fixed", "wall / fixed"),
        ("cpu_fixed", "CPU / fixed"),
    ]

    def cell(name: str, key: str) -> str:
        vals = [r["methods"][name][key] for r in results if r["methods"][name][key] is not None]
        if not vals:
            return ""
        return f"{np.median(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"

    print(f"## bench_train_step, {args.processes} processes\n")
    print(machine + "\n")
    print(
        f"Each process: median of {results[0]['repeats']} interleaved rounds of {args.steps} steps per "
        f"method (options as in the single-process run). Cells: median over the {args.processes} "
        f"processes of the per-process median ratio, [min, max] over processes.\n"
    )
    rows = [[f"`{n}`", _fmt_every(METHODS[n]), *(cell(n, k) for k, _ in keys)] for n in names]
    print(markdown_table(["method", "n", *(h for _, h in keys)], rows, align="lrrrrr"))
    print()
    for name in GRADIENT_STATISTICS:
        if name not in names:
            continue
        med = {
            k: float(np.median([r["methods"][name][k] for r in results]))
            for k, _ in keys
            if k.endswith("sum")
        }
        verdict = "met" if max(med.values()) <= TARGET_RATIO else "NOT met"
        print(
            f"- Issue requirement, `{name}` (n={STAT_EVERY}) within 5% of the plain sum, median over "
            f"processes: wall {med['wall_sum']:.3f}, CPU {med['cpu_sum']:.3f} ({verdict})."
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated rows from {list(METHODS)}; '{BASELINE}' is always added, and "
        f"'{STRUCTURED_BASELINE}' whenever a make_train_step row is chosen (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15, quick 3)")
    parser.add_argument(
        "--steps",
        type=int,
        default=100,
        help=f"consecutive steps per method per round, a multiple of {STAT_EVERY}",
    )
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--num-losses", type=int, default=4)
    parser.add_argument(
        "--residual-layout",
        choices=tuple(RESIDUAL_LAYOUTS),
        default="per_term",
        help="per_term: one forward pass per loss term (how PINN losses are written; default); "
        "shared: one forward pass over all K slices, split into the terms",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="repeat the whole benchmark in this many fresh processes and summarise the per-process "
        "ratios (a process's compiled steps can be a few %% faster or slower than in the next one)",
    )
    add_jax_dispatch_option(parser)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)  # per-process ratios, for --processes
    args = parser.parse_args()
    apply_jax_dispatch(args.jax_dispatch)
    if args.processes > 1:
        run_processes(args)
        return
    machine = machine_info_markdown()  # before the run: the load average then is other processes'

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    chosen = {BASELINE, *names}
    if any(METHODS[n].path in BALANCER_PATHS for n in names):
        chosen.add(STRUCTURED_BASELINE)
    names = [n for n in METHODS if n in chosen]  # table order
    if args.steps < STAT_EVERY or args.steps % STAT_EVERY:
        parser.error(f"--steps must be a positive multiple of {STAT_EVERY}, got {args.steps}")
    if args.batch % args.num_losses:
        parser.error("--batch must divide by --num-losses")
    repeats = args.repeats or (3 if args.quick else 15)
    if not args.quick and repeats < 5:
        parser.error("use at least 5 rounds (or --quick)")
    steps = args.steps
    warmup = 1  # after the compiling call and the calibration calls
    k = args.num_losses

    key_params, key_data = jax.random.split(jax.random.PRNGKey(0))
    params0 = init_mlp(key_params)
    batch = make_batch(key_data, args.batch, k)
    terms = Terms(RESIDUAL_LAYOUTS[args.residual_layout])
    num_params = sum(p.size for p in jax.tree.leaves(params0))

    path_diff = None
    if {"softadapt", "softadapt_per_component"} <= set(names):
        path_diff = check_paths_agree(terms, k, params0, batch)
    res_err = None
    if any(n.startswith("ntk") for n in names):
        res_err = check_residuals(terms.residuals, params0, batch)

    runners, readers, number, kernels = {}, {}, {}, {}
    for name in names:
        runners[name], readers[name] = make_runner(METHODS[name], terms, k, params0, batch)
        block(runners[name]())  # compile
        kernels[name] = runners[name].kernels()
        # Rows with update_every = 1 do the same work on every step, so any chain is fair: a row
        # whose step is too slow for `steps` per round (ntk_every1) runs a shorter one.
        if METHODS[name].update_every == 1:
            number[name] = calls_per_round(runners[name], ROUND_BUDGET_S, cap=steps)
        else:
            number[name] = steps
    timings = time_interleaved(runners, repeats=repeats, number=number, warmup=warmup, block_each=False)
    for name in names:
        if name.removesuffix("_every1") in GRADIENT_STATISTICS:
            check_recomputed(name, readers[name]())
        elif name.startswith("grad_norm_hold"):
            check_held(name, readers[name]())

    base = timings[BASELINE]
    struct = timings.get(STRUCTURED_BASELINE)
    ratios: dict[str, tuple[float, float]] = {}
    rows = []
    for name in names:
        t = timings[name]
        ratios[name] = (
            _median_ratio(t.samples, base.samples),
            _median_ratio(t.cpu_samples, base.cpu_samples),
        )
        if struct is not None:
            vs_fixed = [
                f"{_median_ratio(t.samples, struct.samples):.3f}",
                f"{_median_ratio(t.cpu_samples, struct.cpu_samples):.3f}",
            ]
        else:
            vs_fixed = ["", ""]
        rows.append(
            [
                f"`{name}`",
                METHODS[name].description,
                _fmt_every(METHODS[name]),
                str(kernels[name]),
                fmt_us(t.median),
                fmt_us(t.best),
                fmt_us(t.cpu_median),
                f"{ratios[name][0]:.3f}",
                f"{ratios[name][1]:.3f}",
                *vs_fixed,
            ]
        )

    if args.json:
        per_method = {}
        for name in names:
            t = timings[name]
            per_method[name] = {
                "wall_sum": ratios[name][0],
                "cpu_sum": ratios[name][1],
                "wall_fixed": _median_ratio(t.samples, struct.samples) if struct else None,
                "cpu_fixed": _median_ratio(t.cpu_samples, struct.cpu_samples) if struct else None,
                "wall_us": t.median * 1e6,
                "kernels": kernels[name],
                "cpu_us": t.cpu_median * 1e6,
            }
        with open(args.json, "w") as f:
            json.dump({"repeats": repeats, "methods": per_method}, f)

    print(f"## bench_train_step{' (--quick)' if args.quick else ''}\n")
    print(machine + "\n")
    notes = [
        f"MLP 2-64-64-64-1 tanh ({num_params:,} parameters), batch {args.batch}, K={k} losses "
        f"(residual layout `{args.residual_layout}`), adam(1e-3), JAX dispatch `{args.jax_dispatch}`; "
        f"median of {repeats} interleaved rounds of {steps} consecutive dependent steps per method "
        f"(every round of an n={STAT_EVERY} row holds exactly {steps // STAT_EVERY} recompute step(s))."
    ]
    short = {n: c for n, c in number.items() if c < steps}
    if short:
        notes.append(
            "Shorter chains (update_every=1 rows, every step alike): "
            + ", ".join(f"`{n}` {c}" for n, c in short.items())
            + " steps per round."
        )
    if path_diff is not None:
        notes.append(f"Paths (a) and (b) agree to max |dparam| = {path_diff:.1e} after 8 steps.")
    if res_err is not None:
        notes.append(f"NTK residuals_fn row by row matches the batched residuals to {res_err:.1e}.")
    print(" ".join(notes) + "\n")
    headers = [
        "method",
        "step",
        "n",
        "kernels",
        "wall median (µs)",
        "wall best (µs)",
        "CPU median (µs)",
        "wall / sum",
        "CPU / sum",
        "wall / fixed",
        "CPU / fixed",
    ]
    print(markdown_table(headers, rows, align="llrrrrrrrrr"))
    print(
        f"\n`n`: update_every of the balancer. `kernels`: operations (fusions, dots, copies, custom "
        f"calls) the compiled step launches on a step without a statistic, a conditional counting one "
        f"plus its shortest branch (`count_kernels`). Ratios: median over rounds of the per-round ratio "
        f"(wall clock, and process CPU time), against `{BASELINE}` (raw value_and_grad, THE baseline) "
        f"and against `{STRUCTURED_BASELINE}` (the plain sum through make_train_step + fixed_balancer)."
    )

    def verdict(v: float) -> str:
        return "met" if v <= TARGET_RATIO else "NOT met"

    print()
    if "sum_state" in ratios:
        r, c = ratios["sum_state"]
        t = timings["sum_state"]
        print(
            f"- Noise floor: `sum_state` does the work of `sum` (plus a step counter): wall {r:.3f} "
            f"(rounds IQR {_ratio_iqr(t.samples, base.samples)}), CPU {c:.3f} "
            f"(IQR {_ratio_iqr(t.cpu_samples, base.cpu_samples)})."
        )
    if STRUCTURED_BASELINE in kernels and struct is not None:
        extra_kernels = kernels[STRUCTURED_BASELINE] - kernels[BASELINE]
        # From the median per-round ratio, the figure the table reports, not a difference of
        # medians taken in different rounds.
        extra_us = (_median_ratio(struct.samples, base.samples) - 1.0) * base.median * 1e6
        per = f" ({extra_us / extra_kernels:.1f} µs per extra kernel)" if extra_kernels > 0 else ""
        print(
            f"- Kernels per step: `{BASELINE}` {kernels[BASELINE]}, `{STRUCTURED_BASELINE}` "
            f"{kernels[STRUCTURED_BASELINE]} ({extra_kernels:+d}: the balancer state's fields, the "
            f"metrics, the guard); `{STRUCTURED_BASELINE}` takes {extra_us:+.0f} µs of wall time over "
            f"`{BASELINE}`{per}."
        )
    if "sum_guarded" in ratios:
        g = timings["sum_guarded"]
        r, c = ratios["sum_guarded"]
        print(f"- The non-finite guard on the plain sum (`sum_guarded` / `sum`): wall {r:.3f}, CPU {c:.3f}.")
        for name in ("fixed", "fixed_noguard"):
            if name in timings:
                t = timings[name]
                print(
                    f"- `{name}` / `sum_guarded`: wall {_median_ratio(t.samples, g.samples):.3f}, "
                    f"CPU {_median_ratio(t.cpu_samples, g.cpu_samples):.3f}."
                )
    if "softadapt" in ratios:
        r, c = ratios["softadapt"]
        print(
            f"- Target softadapt/sum <= {TARGET_RATIO}: wall {r:.3f} ({verdict(r)}), "
            f"CPU {c:.3f} ({verdict(c)})."
        )
    if "softadapt_per_component" in ratios:
        r, c = ratios["softadapt_per_component"]
        print(f"- Path (a)/sum: wall {r:.2f}, CPU {c:.2f} (K={k} backward passes, vectorised).")
    if "grad_norm_hold" in ratios and struct is not None:
        t = timings["grad_norm_hold"]
        lo, hi = _median_ci(t.cpu_samples, struct.cpu_samples)
        print(
            f"- Hold steps (`grad_norm_hold`: the cond step whose statistic branch never runs) against "
            f"`fixed`: wall {_median_ratio(t.samples, struct.samples):.3f}, CPU "
            f"{_median_ratio(t.cpu_samples, struct.cpu_samples):.3f} (95% CI [{lo:.3f}, {hi:.3f}])."
        )
    for name in GRADIENT_STATISTICS:
        if name not in ratios:
            continue
        r, c = ratios[name]
        t = timings[name]
        wlo, whi = _median_ci(t.samples, base.samples)
        clo, chi = _median_ci(t.cpu_samples, base.cpu_samples)
        line = (
            f"- Issue requirement, `{name}` (n={STAT_EVERY}) average step within 5% of the plain sum: "
            f"wall {r:.3f} ({verdict(r)}; 95% CI of the median [{wlo:.3f}, {whi:.3f}]), "
            f"CPU {c:.3f} ({verdict(c)}; 95% CI [{clo:.3f}, {chi:.3f}])"
        )
        if struct is not None:
            line += f"; against `fixed`: wall {_median_ratio(t.samples, struct.samples):.3f}, CPU " + (
                f"{_median_ratio(t.cpu_samples, struct.cpu_samples):.3f}"
            )
        if "sum_guarded" in timings:
            g = timings["sum_guarded"]
            line += (
                f"; against `sum_guarded`: wall {_median_ratio(t.samples, g.samples):.3f}, CPU "
                f"{_median_ratio(t.cpu_samples, g.cpu_samples):.3f}"
            )
        every1 = f"{name}_every1"
        if every1 in timings and struct is not None:
            extra = timings[every1].cpu_median - struct.cpu_median
            amortised = 100 * extra / STAT_EVERY / base.cpu_median
            line += (
                f"; a statistic step costs +{fmt_us(extra)} µs CPU over `fixed` "
                f"({timings[every1].cpu_median / struct.cpu_median:.1f}x), "
                f"amortised over {STAT_EVERY} steps +{amortised:.1f}% of `sum`"
            )
        print(line + ".")


if __name__ == "__main__":
    main()
