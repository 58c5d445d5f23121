"""PCGrad (Yu et al. 2020) as a Jacobian aggregator: torchjd's form by default, LibMTL's as an option."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_choice
from softadapt_jax.gradients.aggregators._core import (
    Aggregator,
    check_jacobian,
    check_key,
    gramian_of,
    no_state,
)
from softadapt_jax.gradients.combiners import _random_orders, pcgrad_weights

PCGRAD_CONVENTIONS = ("torchjd", "libmtl")


def pcgrad_direction(
    jacobian: Any, orders: Any, *, convention: str = "torchjd"
) -> tuple[jax.Array, jax.Array]:
    """PCGrad's update for ``J [K, n]`` and given visiting orders.

    Every row ``g_i`` is projected, in the order ``orders[i]``, onto the
    normal plane of each original ``g_j`` it conflicts with; the update is
    the SUM of the projected rows, ``d = c @ J`` with ``c`` from the Gramian
    (:func:`softadapt_jax.gradients.combiners.pcgrad_weights`).

    Args:
      jacobian: ``[K, n]``.
      orders: ``[K, K]`` ints, row i a permutation of ``0..K-1``: torchjd's
        K ``torch.randperm(K)`` draws, or LibMTL's ``random.shuffle`` results.
      convention: ``"torchjd"`` (j = i skipped, no epsilon) or ``"libmtl"``
        (i visited too, ``+1e-8`` on ``||g_j||^2``).

    Returns:
      ``(d [n], c [K])``.

    Raises:
      ValueError: ``orders`` is not ``[K, K]``, or an unknown ``convention``.
    """
    check_choice(convention, "convention", PCGRAD_CONVENTIONS)
    j = check_jacobian(jacobian)
    k = j.shape[0]
    orders = jnp.asarray(orders)
    if orders.shape != (k, k) or not jnp.issubdtype(orders.dtype, jnp.integer):
        raise ValueError(
            f"`orders` must be integers of shape ({k}, {k}) (one permutation of 0..K-1 per row), "
            f"got {orders.dtype} {tuple(orders.shape)}."
        )
    c = pcgrad_weights(gramian_of(j), orders, convention=convention)
    return jnp.matmul(c, j, precision=jax.lax.Precision.HIGHEST), c


def pcgrad(*, convention: str = "torchjd") -> Aggregator:
    """PCGrad, projecting conflicting gradients (Yu et al. 2020, arXiv:2001.06782).

    ``update(J, (), key=key)`` draws one random permutation of the K rows per
    row from ``key`` and returns :func:`pcgrad_direction`.

    Conventions:

    * ``"torchjd"`` (default): torchjd 0.18.0 ``torchjd/aggregation/_pcgrad.py``
      (``PCGrad``, no constructor arguments): a fresh ``randperm(K)`` per row,
      j = i skipped, no epsilon (a zero row has a zero inner product and is
      never divided by).
    * ``"libmtl"``: LibMTL (git 4336804) ``LibMTL/weighting/PCGrad.py``: a
      ``random.shuffle`` of all K tasks per task (i included), ``1e-8`` added
      to ``||g_j||^2``.

    Both return the sum of the projected rows (not the mean). Finite for a
    finite Jacobian; a NaN entry makes the update NaN (no state).

    Args:
      convention: ``"torchjd"`` or ``"libmtl"`` (static).

    Returns:
      A stateless :class:`Aggregator` named ``"pcgrad"`` that needs ``key``.
    """
    check_choice(convention, "convention", PCGRAD_CONVENTIONS)

    def update(jacobian: Any, state: Any, *, losses: Any = None, key: Any = None) -> tuple[jax.Array, Any]:
        del losses
        j = check_jacobian(jacobian)
        orders = _random_orders(check_key(key, "pcgrad"), j.shape[0])
        return pcgrad_direction(j, orders, convention=convention)[0], state

    return Aggregator(name="pcgrad", init=no_state, update=update, needs_key=True)


AGGREGATORS = {"pcgrad": pcgrad}
