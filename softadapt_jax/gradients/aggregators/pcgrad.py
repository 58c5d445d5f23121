"""PCGrad, projecting conflicting gradients (Yu et al. 2020, arXiv:2001.06782): torchjd's and LibMTL's forms.

Every gradient ``g_i`` is projected, in a random order, onto the normal plane
of each original ``g_j`` it conflicts with; the update is the SUM of the
projected gradients. Each projection subtracts a multiple of an original
gradient, so the update is ``c @ J`` with coefficients ``c`` computed from the
Gramian alone (:func:`pcgrad_weights`). Conventions:

* ``"torchjd"`` (this registry's default): torchjd 0.18.0
  ``torchjd/aggregation/_pcgrad.py`` (``PCGrad``, Algorithm 1 of the paper):
  a fresh ``randperm(K)`` per row, ``j = i`` skipped, no epsilon (a zero row
  has a zero inner product and is never divided by).
* ``"libmtl"``: LibMTL git 4336804 ``LibMTL/weighting/PCGrad.py`` (also the
  visiting rule of the authors' released code): a ``random.shuffle`` of all
  K tasks per task (i included), ``1e-8`` added to ``||g_j||^2``; the default
  of :func:`softadapt_jax.gradients.pcgrad` and of :func:`pcgrad_weights`.

Both differ only when ``||g_j||^2`` is comparable to 1e-8 or when a
projection turns ``g_i^PC`` against ``g_i``.
"""

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

PCGRAD_CONVENTIONS = ("torchjd", "libmtl")
_LIBMTL_EPS = 1e-8  # LibMTL's denominator guard


def _random_orders(key: jax.Array, num: int) -> jax.Array:
    """``[K, K]`` int array: row i is a random permutation of ``0..K-1`` (PCGrad's visiting order for i)."""
    keys = jax.random.split(key, num)
    return jax.vmap(lambda kk: jax.random.permutation(kk, num))(keys)


def _orders(key: Any, num: int, random_order: bool) -> jax.Array:
    # Deterministic visiting (random_order=False): every i visits j = 0..K-1 in order.
    if random_order:
        return _random_orders(check_key(key, "pcgrad"), num)
    return jnp.tile(jnp.arange(num), (num, 1))


def pcgrad_weights(gram: jax.Array, orders: jax.Array, *, convention: str = "libmtl") -> jax.Array:
    """PCGrad's coefficients: ``sum_i g_i^PC = sum_k c_k g_k`` (module docstring).

    ``g_i^PC`` is tracked as a coefficient vector ``a`` over the original
    gradients, so ``<g_i^PC, g_j> = (G a)_j`` needs only the Gramian.

    To replay a reference's random draws, pass its orders: torchjd's K
    ``torch.randperm(K)`` draws are the rows of ``orders`` as they are;
    LibMTL's ``random.shuffle`` results (the lists after shuffling, one per
    task i in order) likewise.

    Args:
      gram: ``[K, K]`` Gramian.
      orders: ``[K, K]`` ints; row i is a permutation of ``0..K-1``, the
        order in which ``g_i`` visits the j's.
      convention: ``"libmtl"`` (default: i itself is visited, ``eps = 1e-8``)
        or ``"torchjd"`` (i is skipped, ``eps = 0``).

    Returns:
      ``c``: ``[K]`` coefficients.
    """
    check_choice(convention, "convention", PCGRAD_CONVENTIONS)
    k = gram.shape[0]
    eye = jnp.eye(k, dtype=gram.dtype)
    eps = _LIBMTL_EPS if convention == "libmtl" else 0.0
    skip_self = convention == "torchjd"

    def one(i: jax.Array, order: jax.Array) -> jax.Array:
        def step(a: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
            dot = a @ gram[:, j]
            den = gram[j, j] + eps
            # Only conflicting pairs are projected; a zero gradient g_j has dot == 0, so the
            # guard on den only keeps the unused branch finite.
            project = (dot < 0) & (den > 0)
            if skip_self:
                project = project & (j != i)
            coef = jnp.where(project, dot / jnp.where(den > 0, den, 1.0), 0.0)
            return a - coef * eye[j], None

        a, _ = jax.lax.scan(step, eye[i], order)
        return a

    return jnp.sum(jax.vmap(one)(jnp.arange(k), orders), axis=0)


def pcgrad_direction(
    jacobian: Any, orders: Any, *, convention: str = "torchjd"
) -> tuple[jax.Array, jax.Array]:
    """PCGrad's update for ``J [K, n]`` and given visiting orders.

    Every row ``g_i`` is projected, in the order ``orders[i]``, onto the
    normal plane of each original ``g_j`` it conflicts with; the update is
    the SUM of the projected rows, ``d = c @ J`` with ``c`` from the Gramian
    (:func:`pcgrad_weights`).

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


def pcgrad(*, convention: str = "torchjd", random_order: bool = True) -> Aggregator:
    """torchjd's ``PCGrad()``, with LibMTL's form and a deterministic order as options.

    ``update(J, (), key=key)`` draws one random permutation of the K rows per
    row from ``key`` and returns :func:`pcgrad_direction`; ``weighting(G,
    key=key)`` gives its coefficients from the Gramian (the optax adapter's
    route). LibMTL's ``PCGrad`` is ``pcgrad(convention="libmtl")`` (the optax
    transform :func:`softadapt_jax.gradients.pcgrad` is that aggregator
    through :func:`~softadapt_jax.gradients.aggregators.optax_adapter.aggregate`).
    Finite for a finite Jacobian; a NaN entry makes the update NaN.

    Args:
      convention: ``"torchjd"`` (default) or ``"libmtl"`` (module docstring; static).
      random_order: if False, every row visits ``j = 0..K-1`` in order and no
        key is needed.

    Returns:
      A stateless :class:`Aggregator` named ``"pcgrad"``, that needs ``key``
      when ``random_order``.
    """
    check_choice(convention, "convention", PCGRAD_CONVENTIONS)
    if not isinstance(random_order, bool):
        raise TypeError(f"`random_order` must be a bool, got {random_order!r}.")

    def weighting(gramian: jax.Array, *, key: Any = None) -> jax.Array:
        orders = _orders(key, gramian.shape[0], random_order)
        return pcgrad_weights(gramian, orders, convention=convention)

    def update(jacobian: Any, state: Any, *, losses: Any = None, key: Any = None) -> tuple[jax.Array, Any]:
        del losses
        j = check_jacobian(jacobian)
        orders = _orders(key, j.shape[0], random_order)
        return pcgrad_direction(j, orders, convention=convention)[0], state

    return Aggregator(
        name="pcgrad", init=no_state, update=update, weighting=weighting, needs_key=random_order
    )


AGGREGATORS = {"pcgrad": pcgrad}
