"""Gradient statistics that gradient-based weightings need, computed only when asked.

Learning-rate annealing, gradient-norm and NTK weighting look at the
per-component gradients, which cost K backward passes. The balancers that use
them set ``recompute_next`` in their state, and the train step
(:func:`softadapt_jax.training.make_train_step`) computes the statistic only
on those steps (under a ``lax.cond``). :func:`compute_statistic` is
the stand-alone form; :func:`statistic_from_grads` reduces gradients already
computed.

Statistics (``kind``), one row per loss component (or per group of
components, whose losses are summed first):

* ``"grad_abs"``: ``[G, 2]``, the max and the mean of ``|dL_g/dθ|``
  (learning-rate annealing). ``mean_over="entries"`` averages over every
  selected entry; ``"leaves"`` averages the per-leaf (per-layer) means, as the
  learning-rate-annealing authors do. :func:`per_leaf_grad_abs` gives the
  per-leaf values.
* ``"grad_norm"``: ``[G]``, ``||dL_g/dθ||_2`` (gradient-norm weighting).
* ``"sqrt_loss_grad_norm"``: ``[G]``, ``||d sqrt(|L_g|)/dθ||_2 =
  ||dL_g/dθ|| / (2 sqrt|L_g|)`` (PhysicsNeMo's NTK weighting).
* ``"ntk_trace"``: ``[G]``, the mean over the points of ``||dr_i/dθ||²``, the
  diagonal of the neural tangent kernel of the per-point residuals ``r``
  (NTK weighting); needs ``residuals_fn``.

``params_filter`` selects the parameters every statistic looks at:
``"all"`` (every leaf), ``"kernels"`` (leaves with ``ndim >= 2``: weight
matrices, not biases), or an optax-style callable ``params -> pytree of
bools`` (called with ``jax.ShapeDtypeStruct`` leaves).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax import _checks
from softadapt_jax.balancers.base import group_sum
from softadapt_jax.gradients.per_component import per_component_grads

#: The statistic kinds :func:`compute_statistic` computes.
STATISTICS: tuple[str, ...] = ("grad_abs", "grad_norm", "sqrt_loss_grad_norm", "ntk_trace")
#: The kinds that reduce per-component gradients (the others need per-point residuals).
GRADIENT_STATISTICS: tuple[str, ...] = ("grad_abs", "grad_norm", "sqrt_loss_grad_norm")
#: Which parameters enter a statistic (every leaf, or the weight matrices only).
PARAMS_FILTERS: tuple[str, ...] = ("all", "kernels")
MEAN_OVER: tuple[str, ...] = ("entries", "leaves")

ParamsFilter = Any  # "all", "kernels", or a callable params -> pytree of bools


def check_params_filter(params_filter: ParamsFilter) -> ParamsFilter:
    """Validates ``params_filter`` (module docstring): one of :data:`PARAMS_FILTERS` or a callable."""
    if callable(params_filter):
        return params_filter
    if isinstance(params_filter, str):
        return _checks.check_choice(params_filter, "params_filter", PARAMS_FILTERS)
    raise TypeError(
        f"`params_filter` must be one of {list(PARAMS_FILTERS)} or a callable params -> pytree of bools "
        f"(a static, hashable configuration value), got {type(params_filter).__name__}: {params_filter!r}."
    )


def select_leaves(tree: Any, params_filter: ParamsFilter, *, stacked: bool = False) -> list[jax.Array]:
    """The leaves of a gradient pytree that ``params_filter`` selects, in tree order.

    Args:
      tree: gradients with the structure of the parameters.
      params_filter: ``"all"``, ``"kernels"`` or a callable (module docstring).
      stacked: the leaves carry a leading component axis (``[K, *param.shape]``);
        the filter then looks at ``param.shape``.

    Raises:
      ValueError: the filter selects no leaf, or a callable's mask does not
        match the tree or holds anything but Python bools.
    """
    params_filter = check_params_filter(params_filter)
    leaves, treedef = jax.tree.flatten(tree)
    shapes = [tuple(x.shape[1:] if stacked else x.shape) for x in leaves]
    if params_filter == "all":
        keep = [True] * len(leaves)
    elif params_filter == "kernels":
        keep = [len(s) >= 2 for s in shapes]
    else:
        structs = jax.tree.unflatten(
            treedef, [jax.ShapeDtypeStruct(s, x.dtype) for s, x in zip(shapes, leaves, strict=True)]
        )
        mask = params_filter(structs)
        try:
            keep = treedef.flatten_up_to(mask)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"`params_filter` must return a pytree of bools with the structure of the parameters; "
                f"got {mask!r} ({err})."
            ) from None
        if not all(isinstance(b, (bool, np.bool_)) for b in keep):
            raise ValueError(f"`params_filter` must return Python bools (a static mask), got {keep!r}.")
    selected = [x for x, k in zip(leaves, keep, strict=True) if k]
    if not selected:
        raise ValueError(
            f"`params_filter={params_filter!r}` selects none of the {len(leaves)} parameter leaves "
            f"(shapes {shapes})."
        )
    return selected


def per_leaf_grad_abs(grads: Any, *, params_filter: ParamsFilter = "all") -> jax.Array:
    """``[K, L, 2]``: the max and the mean of ``|g_k|`` over each of the L selected leaves.

    Args:
      grads: a pytree whose leaves are ``[K, ...]``: ``grads[k] = dL_k/dθ``.
      params_filter: which leaves (module docstring).

    Returns:
      ``out[k, l] = (max |dL_k/dθ_l|, mean |dL_k/dθ_l|)`` for the l-th selected leaf.
    """
    flat = [jnp.abs(g.reshape(g.shape[0], -1)) for g in select_leaves(grads, params_filter, stacked=True)]
    return jnp.stack([jnp.stack([jnp.max(g, axis=1), jnp.mean(g, axis=1)], axis=1) for g in flat], axis=1)


def statistic_from_grads(
    kind: str,
    grads: Any,
    *,
    losses: jax.Array | None = None,
    params_filter: ParamsFilter = "all",
    mean_over: str = "entries",
) -> jax.Array:
    """A gradient statistic of stacked per-component gradients.

    Args:
      kind: ``"grad_abs"``, ``"grad_norm"`` or ``"sqrt_loss_grad_norm"``.
      grads: a pytree whose leaves are ``[K, ...]``: ``grads[k] = dL_k/dθ``.
      losses: ``[K]`` the losses the gradients are of (``"sqrt_loss_grad_norm"`` only).
      params_filter: which parameter leaves enter (module docstring).
      mean_over: ``"grad_abs"``'s mean: over all selected ``"entries"``, or
        the plain average of the per-leaf means (``"leaves"``).

    Returns:
      ``[K, 2]`` (max and mean of ``|dL_k/dθ|``) for ``"grad_abs"``, else ``[K]``.

    Raises:
      ValueError: unknown ``kind`` or option, or ``"sqrt_loss_grad_norm"`` without ``losses``.
    """
    _checks.check_choice(kind, "kind", GRADIENT_STATISTICS)
    _checks.check_choice(mean_over, "mean_over", MEAN_OVER)
    flat = [g.reshape(g.shape[0], -1) for g in select_leaves(grads, params_filter, stacked=True)]
    if kind == "grad_abs":
        abs_max = jnp.max(jnp.stack([jnp.max(jnp.abs(g), axis=1) for g in flat]), axis=0)
        if mean_over == "leaves":
            abs_mean = jnp.mean(jnp.stack([jnp.mean(jnp.abs(g), axis=1) for g in flat]), axis=0)
        else:
            abs_mean = sum(jnp.sum(jnp.abs(g), axis=1) for g in flat) / sum(g.shape[1] for g in flat)
        return jnp.stack([abs_max, abs_mean], axis=1)
    norms = jnp.sqrt(sum(jnp.sum(g * g, axis=1) for g in flat))
    if kind == "grad_norm":
        return norms
    if losses is None:
        raise ValueError("The 'sqrt_loss_grad_norm' statistic needs `losses`, the [K] losses of `grads`.")
    # d sqrt|L| = dL / (2 sqrt|L|) for L != 0 (the sign of L does not change the norm).
    return norms / (2.0 * jnp.sqrt(jnp.abs(jnp.asarray(losses, norms.dtype))))


def compute_statistic(
    kind: str,
    loss_components_fn: Callable[..., jax.Array],
    params: Any,
    batch: Any,
    *,
    residuals_fn: Callable[..., Any] | None = None,
    axis_name: str | None = None,
    max_points: int | None = None,
    groups: tuple[int, ...] | None = None,
    params_filter: ParamsFilter = "all",
    mean_over: str = "entries",
) -> jax.Array:
    """The gradient statistic ``kind`` of the loss components (or groups) at ``params``.

    Args:
      kind: one of :data:`STATISTICS` (module docstring).
      loss_components_fn: ``f(params, batch) -> losses [K]``.
      params: parameters pytree.
      batch: the batch.
      residuals_fn: for ``"ntk_trace"``: ``r(params, batch) -> sequence of K
        arrays`` of per-point residuals (or network outputs: the kernel only
        sees their gradients), loss k being the mean square of ``r[k]``. A
        term whose value at a one-row batch (row i of every batch leaf) is a
        single number is taken to be row by row, as PINN collocation sets are:
        point i's gradient then comes from that one-row batch, a backward
        pass through one point. Any other term (points fixed outside the
        batch, several values per point, or rows that interact) is
        differentiated entry by entry at the full batch, one full backward
        pass per entry.
      axis_name: a ``pmap`` axis: losses and gradients (or NTK means) are
        averaged across it first, so every device gets the global statistic.
      max_points: for ``"ntk_trace"``: use at most the first this many points
        of each term (``None``: all of them, as jaxpi does). Collocation
        points are random, so this is an unbiased subsample.
      groups: ``None``, or a length-K tuple of group ids
        (:func:`softadapt_jax.balancers.base.check_groups`): the statistic is
        then of each group's summed loss, ``[G, ...]``. For ``"ntk_trace"`` it
        is the mean over the concatenated points of the group's terms.
      params_filter: which parameters enter (module docstring).
      mean_over: ``"grad_abs"`` only: ``"entries"`` or ``"leaves"``.

    Returns:
      ``[G, 2]`` for ``"grad_abs"``, else ``[G]`` (G = K without ``groups``).

    Raises:
      ValueError: unknown ``kind`` or option, ``"ntk_trace"`` without
        ``residuals_fn``, or a filter that selects no parameter.
    """
    _checks.check_choice(kind, "kind", STATISTICS)
    _checks.check_choice(mean_over, "mean_over", MEAN_OVER)
    params_filter = check_params_filter(params_filter)
    if kind == "ntk_trace":
        if residuals_fn is None:
            raise ValueError(
                "The 'ntk_trace' statistic needs `residuals_fn(params, batch) -> K arrays` of "
                "per-point residuals."
            )
        if max_points is not None:
            _checks.check_positive_int(max_points, "max_points")
        means, counts = _ntk_means(residuals_fn, params, batch, max_points, params_filter)
        if axis_name is not None:
            means = jax.lax.pmean(means, axis_name)
        if groups is None:
            return means
        # Mean over the group's concatenated points: each term weighs by its number of points.
        weights = jnp.asarray(counts, means.dtype)
        return group_sum(means * weights, groups) / group_sum(weights, groups)

    def grouped_fn(p: Any, b: Any) -> jax.Array:
        return group_sum(loss_components_fn(p, b), groups)

    # A loop of VJPs, not vmap: batching the VJP of forward-mode derivative
    # chains (PINN residuals) is several times slower than plain VJPs.
    losses, grads = per_component_grads(grouped_fn, vmap_vjps=False)(params, batch)
    if axis_name is not None:
        losses, grads = jax.lax.pmean((losses, grads), axis_name)
    return statistic_from_grads(kind, grads, losses=losses, params_filter=params_filter, mean_over=mean_over)


def _sum_sq(grad: Any, params_filter: ParamsFilter) -> jax.Array:
    return sum(jnp.sum(leaf**2) for leaf in select_leaves(grad, params_filter))


def _ntk_means(
    residuals_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    max_points: int | None,
    params_filter: ParamsFilter,
) -> tuple[jax.Array, list[int]]:
    """``[K]`` mean squared per-point gradient norms, and the number of points each used.

    Row-by-row terms take one backward pass per point, under ``vmap`` over
    one-row batches; each term gets its own VJP of a function returning that
    term alone, so the backward pass skips the other terms' network passes.
    """
    full = jax.eval_shape(residuals_fn, params, batch)
    one_row = jax.eval_shape(residuals_fn, params, jax.tree.map(lambda x: x[:1], batch))
    if len(one_row) != len(full):
        raise ValueError(
            f"`residuals_fn` returned {len(full)} terms for the batch but {len(one_row)} for one row of it."
        )
    means, counts = [], []
    for k, (whole, row) in enumerate(zip(full, one_row, strict=True)):
        n = int(np.prod(whole.shape))
        m = n if max_points is None else min(n, max_points)
        if int(np.prod(row.shape)) == 1:
            # Rows 0..m-1; leaves with fewer rows (read by other terms only) repeat their last row.
            rows = jax.tree.map(lambda x, m=m: x[np.minimum(np.arange(m), x.shape[0] - 1)][:, None], batch)

            def point_sq_norm(row_batch: Any, k: int = k) -> jax.Array:
                value, vjp_fn = jax.vjp(lambda p: residuals_fn(p, row_batch)[k], params)
                (g,) = vjp_fn(jnp.ones_like(value))
                return _sum_sq(g, params_filter)

            sq = jax.vmap(point_sq_norm)(rows)
        else:
            value, vjp_fn = jax.vjp(lambda p, k=k, m=m: jnp.ravel(residuals_fn(p, batch)[k])[:m], params)
            # One-hot cotangents: the gradient of every entry at once.
            per_entry = jax.vmap(vjp_fn)(jnp.eye(m, dtype=value.dtype))[0]
            sq = jax.vmap(lambda g: _sum_sq(g, params_filter))(per_entry)
        means.append(jnp.mean(sq))
        counts.append(m)
    return jnp.stack(means), counts


def statistic_shape(kind: str, num_groups: int) -> tuple[int, ...]:
    """The shape of statistic ``kind`` for G losses (or groups)."""
    _checks.check_choice(kind, "kind", STATISTICS)
    return (num_groups, 2) if kind == "grad_abs" else (num_groups,)
