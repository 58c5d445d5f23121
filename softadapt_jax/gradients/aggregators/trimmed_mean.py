"""TrimmedMean (Yin et al. 2018): the column-wise mean of the Jacobian after dropping its extremes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_positive_int
from softadapt_jax.gradients.aggregators._core import Aggregator, check_jacobian, no_state

# Up to this many rows the middle values are selected by their ranks
# (K (K - 1) / 2 comparisons per column, all fused into one elementwise pass
# over J); beyond it, by a sort.
_RANK_MAX_ROWS = 32


def _order_keys(rows: jax.Array) -> jax.Array:
    """Integers ordered as ``jnp.sort`` orders the floats ``rows``: NaN last, ``-0.0 < 0.0``.

    The IEEE bit pattern read as a signed integer is ordered for non-negative
    floats and reversed for negative ones; flipping the non-sign bits of the
    negative ones makes it monotone. Every NaN maps to the largest integer.
    """
    int_type = jnp.dtype(f"int{8 * rows.dtype.itemsize}")
    bits = jax.lax.bitcast_convert_type(rows, int_type)
    top = jnp.iinfo(int_type).max
    keys = jnp.where(bits < 0, bits ^ jnp.asarray(top, int_type), bits)
    return jnp.where(jnp.isnan(rows), jnp.asarray(top, int_type), keys)


def _middle_sum(j: jax.Array, t: int) -> jax.Array:
    """``[n]``: per column, the sum of the entries ranked ``t .. K - t - 1`` in a stable sort.

    The stable rank of ``J[r, c]`` counts the rows ``i`` placed before it:
    ``key_i <= key_r`` for ``i < r`` (ties keep the row order) and
    ``key_i < key_r`` for ``i > r``. One comparison per pair of rows serves
    both: ``not (key_i <= key_r)`` is ``key_r < key_i``. The selected
    entries are the middle slice of the sorted column, ties included. Rows
    are Python values (K is static) so that XLA fuses the whole loop.
    """
    k = j.shape[0]
    keys = [_order_keys(j[r]) for r in range(k)]
    ranks = [jnp.zeros(j.shape[1:], jnp.int32) for _ in range(k)]
    for i in range(k):
        for r in range(i + 1, k):
            first = (keys[i] <= keys[r]).astype(jnp.int32)
            ranks[r] = ranks[r] + first
            ranks[i] = ranks[i] + (1 - first)
    # where, not a 0/1 product: a dropped inf must not turn into 0 * inf = NaN.
    kept = [jnp.where((ranks[r] >= t) & (ranks[r] < k - t), j[r], 0.0) for r in range(k)]
    return sum(kept[1:], kept[0])


def trimmed_mean_direction(jacobian: Any, trim_number: int) -> jax.Array:
    """Coordinate-wise trimmed mean of the rows of ``J [K, n]``.

    For every column, the ``trim_number`` smallest and the ``trim_number``
    largest of its K entries are dropped and the remaining
    ``K - 2 * trim_number`` are averaged::

        d_c = mean(sort(J[:, c])[t : K - t])

    Reproduces torchjd 0.18.0 ``torchjd/aggregation/_trimmed_mean.py``
    (``TrimmedMean``). NaN entries sort after every number (as in
    ``torch.sort``), so a NaN is dropped as a largest value when it is among
    the ``trim_number`` last; otherwise it reaches the mean and that column's
    entry is NaN.

    For ``K <= 32`` no sort is formed: each entry's stable rank in its column
    (``_middle_sum``: ``K (K - 1) / 2`` integer comparisons per column, fused
    by XLA into one pass over ``J``) selects the same middle values, which are
    summed in row order; XLA's CPU sort along the short axis of a ``[K, n]``
    array calls a comparator per element pair and does not vectorise. Larger K sorts.

    Args:
      jacobian: ``[K, n]``, ``K >= 2 * trim_number + 1``.
      trim_number: values removed at each end of every column (static, >= 0).

    Returns:
      ``d [n]``.

    Raises:
      ValueError: ``K < 2 * trim_number + 1`` (nothing would be left to average).
    """
    t = check_positive_int(trim_number, "trim_number", minimum=0)
    j = check_jacobian(jacobian)
    k = j.shape[0]
    if k < 2 * t + 1:
        raise ValueError(
            f"`jacobian` must have at least 2 * trim_number + 1 = {2 * t + 1} rows for trim_number={t}, "
            f"got shape {tuple(j.shape)}."
        )
    if t == 0:
        return jnp.mean(j, axis=0)
    if k > _RANK_MAX_ROWS:
        return jnp.mean(jnp.sort(j, axis=0)[t : k - t], axis=0)
    return _middle_sum(j, t) / (k - t - t)


def trimmed_mean(*, trim_number: int) -> Aggregator:
    """TrimmedMean, a Byzantine-robust aggregator (Yin et al. 2018, arXiv:1803.01498).

    Not a weighting of the Gramian: every coordinate is trimmed separately
    (:func:`trimmed_mean_direction`). Reproduces torchjd 0.18.0 ``TrimmedMean``.

    Args:
      trim_number: number of largest and of smallest values removed from each
        column (torchjd's required argument; static int >= 0). ``0`` is the Mean.

    Returns:
      A stateless :class:`Aggregator` named ``"trimmed_mean"``.
    """
    t = check_positive_int(trim_number, "trim_number", minimum=0)

    def update(jacobian: Any, state: Any, *, losses: Any = None, key: Any = None) -> tuple[jax.Array, Any]:
        del losses, key
        return trimmed_mean_direction(jacobian, t), state

    return Aggregator(name="trimmed_mean", init=no_state, update=update)


AGGREGATORS = {"trimmed_mean": trimmed_mean}
