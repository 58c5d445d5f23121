"""Krum and Multi-Krum (Blanchard et al. 2017) as a weighting of the Gramian."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_positive_int
from softadapt_jax.gradients.aggregators._core import Aggregator, from_weighting


def _less(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a < b`` with NaN ordered after every number (the comparison torch's CPU top-k uses)."""
    return (~jnp.isnan(a) & jnp.isnan(b)) | (a < b)


def _swap(arr: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    ai, aj = arr[i], arr[j]
    return arr.at[i].set(aj).at[j].set(ai)


def _stable_sort_range(
    vals: jax.Array, idx: jax.Array, first: jax.Array, last: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Positions ``[first, last)`` stably sorted by value (NaN last), the others left in place."""
    pos = jnp.arange(vals.shape[0])
    inside = (pos >= first) & (pos < last)
    before = _less(vals[None, :], vals[:, None]) | (
        ~_less(vals[None, :], vals[:, None])
        & ~_less(vals[:, None], vals[None, :])
        & (pos[None, :] < pos[:, None])
    )
    rank = jnp.sum(before & inside[None, :], axis=1)
    dest = jnp.where(inside, first + rank, pos)
    return jnp.zeros_like(vals).at[dest].set(vals), jnp.zeros_like(idx).at[dest].set(idx)


def _select_smallest(values: jax.Array, count: int) -> jax.Array:
    """Indices of the ``count`` smallest ``values`` with torch's CPU ``topk(largest=False)`` tie rule.

    Exact ties in the scores are common (for K = n_byzantine + 3 every row's
    score is one distance, so the two rows of the closest pair always tie),
    and torch resolves them by the order its selection algorithm leaves the
    entries in, not by index. For ``64 * count > K`` torch runs libstdc++'s
    ``std::nth_element`` (introselect: median-of-three pivot, unguarded
    Hoare partition, insertion sort of the last <= 3 entries), which is
    replayed here step by step. For ``64 * count <= K`` torch uses a heap
    selection, whose choice for ``count == 1`` is the lowest index among
    ties (taken here for any ``count``). Introselect's own heap fallback,
    reached only after ``2 floor(log2 K)`` unbalanced partitions, is
    replaced by a stable sort of the remaining range.
    """
    k = values.shape[0]
    nth = count - 1
    idx = jnp.arange(k)
    if 64 * count <= k or k <= 3:
        order = jnp.argsort(jnp.where(jnp.isnan(values), jnp.inf, values), stable=True)
        nan_last = jnp.argsort(jnp.isnan(values[order]), stable=True)
        return order[nan_last][:count]

    def median_to_first(vals: jax.Array, idx: jax.Array, first: jax.Array, last: jax.Array):
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        va, vb, vc = vals[a], vals[b], vals[c]
        ab, bc, ac = _less(va, vb), _less(vb, vc), _less(va, vc)
        pick = jnp.where(ab, jnp.where(bc, b, jnp.where(ac, c, a)), jnp.where(ac, a, jnp.where(bc, c, b)))
        return _swap(vals, first, pick), _swap(idx, first, pick)

    def partition(vals: jax.Array, idx: jax.Array, first: jax.Array, last: jax.Array):
        pivot = vals[first]  # stays at `first`, outside the range being partitioned

        def body(carry):
            vals, idx, lo, hi, _ = carry
            lo = jax.lax.while_loop(lambda p: _less(vals[p], pivot), lambda p: p + 1, lo)
            hi = jax.lax.while_loop(lambda p: _less(pivot, vals[p]), lambda p: p - 1, hi - 1)
            cross = lo >= hi
            vals2, idx2 = _swap(vals, lo, hi), _swap(idx, lo, hi)
            vals = jnp.where(cross, vals, vals2)
            idx = jnp.where(cross, idx, idx2)
            return vals, idx, jnp.where(cross, lo, lo + 1), hi, cross

        vals, idx, cut, _, _ = jax.lax.while_loop(
            lambda c: ~c[4], body, (vals, idx, first + 1, last, jnp.asarray(False))
        )
        return vals, idx, cut

    def cond(carry):
        _, _, first, last, depth = carry
        return (last - first > 3) & (depth > 0)

    def step(carry):
        vals, idx, first, last, depth = carry
        vals, idx = median_to_first(vals, idx, first, last)
        vals, idx, cut = partition(vals, idx, first, last)
        left = cut <= nth
        return vals, idx, jnp.where(left, cut, first), jnp.where(left, last, cut), depth - 1

    depth = 2 * (k.bit_length() - 1)
    start = (values, idx, jnp.asarray(0), jnp.asarray(k), jnp.asarray(depth))
    vals, idx, first, last, _ = jax.lax.while_loop(cond, step, start)
    vals, idx = _stable_sort_range(vals, idx, first, last)
    return idx[:count]


def krum_weights(gramian: Any, *, n_byzantine: int, n_selected: int = 1) -> jax.Array:
    """Krum's weights from the Gramian ``G = J J^T``.

    Distances between rows come from the Gramian alone,
    ``D_ij = sqrt(max(G_ii + G_jj - 2 G_ij, 0))`` (rounding can make the
    squared distance of near-identical rows slightly negative; it is read as
    0). Row i scores the sum of its ``K - n_byzantine - 2`` smallest distances
    to the other rows (its own zero distance, the smallest of its row, is
    left out); the ``n_selected`` rows of smallest score get weight
    ``1 / n_selected`` each, the others 0. Exactly tied scores are resolved
    as torch's CPU ``topk`` resolves them (``_select_smallest``), which
    is not by index.

    Reproduces torchjd 0.18.0 ``torchjd/aggregation/_krum.py``
    (``KrumWeighting``). NaN scores (a non-finite Gramian) rank after every
    number, so the weights stay one-hot and finite; the update is then NaN
    only through the NaN rows it selects.

    Args:
      gramian: ``[K, K]``, ``K >= n_byzantine + 3`` and ``K >= n_selected``.
      n_byzantine: number of rows that may be adversarial (static int >= 0).
      n_selected: number of rows averaged (Multi-Krum; static int >= 1).

    Returns:
      ``weights [K]``: ``1 / n_selected`` on the selected rows, else 0.

    Raises:
      ValueError: too few rows for ``n_byzantine`` or ``n_selected``, or a
        non-square ``gramian``.
    """
    f = check_positive_int(n_byzantine, "n_byzantine", minimum=0)
    m = check_positive_int(n_selected, "n_selected", minimum=1)
    g = jnp.asarray(gramian)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"`gramian` must be a square matrix [K, K], got shape {tuple(g.shape)}.")
    k = g.shape[0]
    if k < f + 3:
        raise ValueError(
            f"Krum needs at least n_byzantine + 3 = {f + 3} rows for n_byzantine={f}, got K={k}."
        )
    if k < m:
        raise ValueError(f"Krum needs at least n_selected = {m} rows, got K={k}.")
    sq = jnp.diagonal(g)
    dist = jnp.sqrt(jnp.maximum(sq[None, :] + sq[:, None] - 2.0 * g, 0.0))
    closest = jnp.sort(dist, axis=1)[:, 1 : k - f - 1]
    scores = jnp.sum(closest, axis=1)
    chosen = _select_smallest(scores, m)
    return jnp.sum(jax.nn.one_hot(chosen, k, dtype=g.dtype), axis=0) / m


def krum(*, n_byzantine: int, n_selected: int = 1) -> Aggregator:
    """Krum / Multi-Krum (Blanchard et al. 2017, NeurIPS), a Gramian weighting.

    ``d = w @ J`` with ``w = krum_weights(J J^T)``: the row (or the mean of
    the ``n_selected`` rows) closest to its ``K - n_byzantine - 2`` nearest
    neighbours. Reproduces torchjd 0.18.0 ``Krum``.

    Args:
      n_byzantine: number of possibly adversarial rows (torchjd's required
        argument; static int >= 0).
      n_selected: rows averaged, Multi-Krum (default 1, plain Krum).

    Returns:
      A stateless :class:`Aggregator` named ``"krum"`` with a ``weighting``.
    """
    f = check_positive_int(n_byzantine, "n_byzantine", minimum=0)
    m = check_positive_int(n_selected, "n_selected", minimum=1)
    return from_weighting("krum", functools.partial(krum_weights, n_byzantine=f, n_selected=m))


AGGREGATORS = {"krum": krum}
