"""TrimmedMean (Yin et al. 2018): the column-wise mean of the Jacobian after dropping its extremes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_positive_int
from softadapt_jax.gradients.aggregators._core import Aggregator, check_jacobian, no_state


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
    return jnp.mean(jnp.sort(j, axis=0)[t : k - t], axis=0)


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
