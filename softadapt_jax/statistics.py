"""Gradient statistics that gradient-based weightings need, computed only when asked.

Learning-rate annealing, gradient-norm and NTK weighting look at the
per-component gradients, which cost K backward passes (K VJPs of one forward
pass). The balancers that use them set ``recompute_next`` in their state; the
train step (:func:`softadapt_jax.training.make_train_step`) branches on that
flag with ``lax.cond``, or :func:`softadapt_jax.training.jit_train_step` picks
one of two compiled steps on the host, so the other steps pay one backward
pass only. On the recompute steps the train step takes ``"grad_abs"`` and
``"grad_norm"`` from the same K backward passes that give the step's gradient
(:func:`statistic_from_grads`); :func:`compute_statistic` is the stand-alone
form.

Statistics (``kind``):

* ``"grad_abs"``: ``[K, 2]``, the max and the mean of ``|dL_k/dθ|`` over all
  parameters (learning-rate annealing).
* ``"grad_norm"``: ``[K]``, ``||dL_k/dθ||_2`` (gradient-norm weighting).
* ``"ntk_trace"``: ``[K]``, the mean over the points of loss k of
  ``||dr_{k,i}/dθ||²``, i.e. the trace of its neural tangent kernel divided by
  the number of points (NTK weighting); needs ``residuals_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax import _checks
from softadapt_jax.gradients.per_component import per_component_grads

STATISTICS: tuple[str, ...] = ("grad_abs", "grad_norm", "ntk_trace")


def _per_component_leaves(grads: Any) -> list[jax.Array]:
    return [g.reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)]


def compute_statistic(
    kind: str,
    loss_components_fn: Callable[..., jax.Array],
    params: Any,
    batch: Any,
    *,
    residuals_fn: Callable[..., Any] | None = None,
    axis_name: str | None = None,
    max_points: int | None = None,
) -> jax.Array:
    """The gradient statistic ``kind`` of the K loss components at ``params``.

    Args:
      kind: ``"grad_abs"``, ``"grad_norm"`` or ``"ntk_trace"`` (module docstring).
      loss_components_fn: ``f(params, batch) -> losses [K]``.
      params: parameters pytree.
      batch: the step's batch.
      residuals_fn: for ``"ntk_trace"``: ``r(params, batch) -> sequence of K
        arrays`` of per-point residuals (the terms whose mean square is loss
        k), computed row by row: row i of every batch leaf gives point i of
        each residual, as PINN collocation sets do.
      axis_name: a ``pmap`` axis: the per-component gradients (or NTK traces)
        are averaged across it first, so every device gets the global statistic.
      max_points: for ``"ntk_trace"``: estimate each trace from at most this many
        points (the first rows of every batch leaf, and never more than the
        smallest leaf has; collocation points are random, so this is an
        unbiased subsample). Each point costs one one-row VJP per residual term.

    Returns:
      ``[K, 2]`` for ``"grad_abs"``, else ``[K]``.

    Raises:
      ValueError: unknown ``kind``, or ``"ntk_trace"`` without ``residuals_fn``.
    """
    _checks.check_choice(kind, "kind", STATISTICS)
    if kind == "ntk_trace":
        if residuals_fn is None:
            raise ValueError(
                "The 'ntk_trace' statistic needs `residuals_fn(params, batch) -> K arrays` of "
                "per-point residuals."
            )
        if max_points is not None:
            _checks.check_positive_int(max_points, "max_points")
        traces = _ntk_traces(residuals_fn, params, batch, max_points)
        return traces if axis_name is None else jax.lax.pmean(traces, axis_name)
    # A loop of K VJPs, not vmap: batching the VJP of forward-mode derivative
    # chains (PINN residuals) measured 4-7x slower than K plain VJPs.
    _, grads = per_component_grads(loss_components_fn, vmap_vjps=False)(params, batch)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    return statistic_from_grads(kind, grads)


def statistic_from_grads(kind: str, grads: Any) -> jax.Array:
    """Statistic ``"grad_abs"`` or ``"grad_norm"`` of stacked per-component gradients.

    Args:
      kind: ``"grad_abs"`` or ``"grad_norm"``.
      grads: a pytree whose leaves are ``[K, ...]``: ``grads[k] = dL_k/dθ``.

    Returns:
      ``[K, 2]`` (max and mean of ``|dL_k/dθ|``) or ``[K]`` (``||dL_k/dθ||_2``).
    """
    _checks.check_choice(kind, "kind", ("grad_abs", "grad_norm"))
    flat = _per_component_leaves(grads)
    if kind == "grad_norm":
        return jnp.sqrt(sum(jnp.sum(g * g, axis=1) for g in flat))
    size = sum(g.shape[1] for g in flat)
    abs_max = jnp.max(jnp.stack([jnp.max(jnp.abs(g), axis=1) for g in flat]), axis=0)
    abs_mean = sum(jnp.sum(jnp.abs(g), axis=1) for g in flat) / size
    return jnp.stack([abs_max, abs_mean], axis=1)


def _ntk_traces(
    residuals_fn: Callable[..., Any], params: Any, batch: Any, max_points: int | None
) -> jax.Array:
    """``[K]`` mean squared per-point gradient norms, one point at a time.

    Each point's gradient comes from the residual of a one-row batch, under
    ``vmap`` over rows: M points cost M one-row backward passes, not M passes
    through the whole batch (what ``jacrev`` of the batched residual costs).
    Each residual term gets its own VJP of a function returning that term
    alone, so its backward pass skips the terms it does not depend on: with
    the usual PINN layout (one forward pass per term, on its own points) this
    measured 1.8-2.5x faster on the library's PINN problems than K one-hot
    VJPs of one forward pass of all terms, which push zeros back through every
    other term's network pass (``benchmarks/bench_statistics.py``).
    """
    sizes = [x.shape[0] for x in jax.tree.leaves(batch)]
    m = min(sizes) if max_points is None else min(max_points, *sizes)
    rows = jax.tree.map(lambda x: x[:m, None], batch)
    num = len(jax.eval_shape(residuals_fn, params, jax.tree.map(lambda x: x[0], rows)))

    def point_sq_norms(row_batch: Any) -> jax.Array:
        norms = []
        for k in range(num):
            value, vjp_fn = jax.vjp(lambda p, k=k: residuals_fn(p, row_batch)[k], params)
            (g,) = vjp_fn(jnp.ones_like(value))
            norms.append(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(g)))
        return jnp.stack(norms)

    return jnp.mean(jax.vmap(point_sq_norms)(rows), axis=0)


def statistic_shape(kind: str, num_losses: int) -> tuple[int, ...]:
    """The shape of statistic ``kind`` for K losses."""
    _checks.check_choice(kind, "kind", STATISTICS)
    return (num_losses, 2) if kind == "grad_abs" else (num_losses,)
