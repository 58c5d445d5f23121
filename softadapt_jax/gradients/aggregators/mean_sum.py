"""Mean and Sum: the constant weightings ``1/K`` and ``1`` (torchjd's ``Mean`` and ``Sum``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softadapt_jax.gradients.aggregators._core import Aggregator, from_weighting


def mean_weights(gramian: jax.Array) -> jax.Array:
    """``[1/K] * K``, whatever the Gramian (torchjd 0.18.0, ``aggregation/_mean.py``, ``MeanWeighting``)."""
    k = gramian.shape[0]
    return jnp.full((k,), 1.0 / k, gramian.dtype)


def sum_weights(gramian: jax.Array) -> jax.Array:
    """``[1] * K``, whatever the Gramian (torchjd 0.18.0, ``aggregation/_sum.py``, ``SumWeighting``)."""
    return jnp.ones((gramian.shape[0],), gramian.dtype)


def mean() -> Aggregator:
    """torchjd's ``Mean()``: the average of the rows, ``d = (1/K) sum_k g_k``."""
    return from_weighting("mean", mean_weights)


def sum() -> Aggregator:
    """torchjd's ``Sum()``: the sum of the rows, ``d = sum_k g_k`` (what task-specific leaves get)."""
    return from_weighting("sum", sum_weights)


AGGREGATORS = {"mean": mean, "sum": sum}
