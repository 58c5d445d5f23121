"""GradVac, gradient vaccine (Wang et al. 2021): stateful cosine targets between task gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax._checks import all_finite, check_choice, check_float
from softadapt_jax.gradients.aggregators._core import (
    Aggregator,
    check_jacobian,
    check_key,
    combine_rows,
    gramian_of,
)

GRADVAC_CONVENTIONS = ("torchjd", "libmtl")


class GradVacState(NamedTuple):
    """State of :func:`gradvac`."""

    phi_hat: jax.Array  # [K, K] float, the EMA targets phi_hat[i, j] of cos(g_i^PC, g_j); diagonal unused


def _check_orders(orders: Any, k: int) -> jax.Array:
    orders = jnp.asarray(orders)
    if orders.shape != (k, k - 1) or not jnp.issubdtype(orders.dtype, jnp.integer):
        raise ValueError(
            f"`orders` must be integers of shape ({k}, {k - 1}) (row i: the other tasks in visiting order), "
            f"got {orders.dtype} {tuple(orders.shape)}."
        )
    return orders


def _check_phi_hat(phi_hat: Any, k: int, dtype: Any) -> jax.Array:
    phi = jnp.asarray(phi_hat)
    if phi.shape != (k, k):
        raise ValueError(
            f"the GradVac state `phi_hat` must have shape ({k}, {k}) for K={k} tasks, got {tuple(phi.shape)}."
        )
    return phi.astype(dtype)


def _correction(
    norm_i: jax.Array, norm_j: jax.Array, phi: jax.Array, hat: jax.Array, eps: float
) -> jax.Array:
    """The multiple of g_j that raises cos(g_i^PC, g_j) from ``phi`` to ``hat`` (0 when not below it)."""
    root_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
    root_hat = jnp.sqrt(jnp.maximum(1.0 - hat * hat, 0.0))
    den = norm_j * root_hat + eps
    w = norm_i * (hat * root_phi - phi * root_hat) / jnp.where(den > 0, den, 1.0)
    # den == 0 only for eps = 0 with a zero g_j or a target of +-1: nothing finite to add.
    return jnp.where((phi < hat) & (den > 0), w, 0.0)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    # 0/0 (only reachable with eps = 0 and a zero gradient) is read as cosine 0.
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def gradvac_weights(
    gramian: Any, phi_hat: Any, orders: Any, *, beta: float = 0.5, eps: float = 1e-8
) -> tuple[jax.Array, jax.Array]:
    """GradVac's weights from the Gramian, and the advanced targets.

    Row i starts at ``g_i^PC = g_i`` (coefficients ``c_i = e_i`` over the
    original rows) and visits the other rows j in ``orders[i]``; with
    ``phi = <g_i^PC, g_j> / (||g_i^PC|| ||g_j|| + eps)`` and the target
    ``h = phi_hat[i, j]``, if ``phi < h`` it adds ``w g_j`` with::

        w = ||g_i^PC|| (h sqrt(1 - phi^2) - phi sqrt(1 - h^2)) / (||g_j|| sqrt(1 - h^2) + eps)

    then ``phi_hat[i, j] <- (1 - beta) h + beta phi`` (every visit). All
    inner products are ``c_i G``. The weights are ``sum_i c_i``, so the
    update is ``weights @ J``, the sum of the corrected rows.

    Reproduces torchjd 0.18.0 ``torchjd/aggregation/_gradvac.py``
    (``GradVacWeighting``), including its clamps of ``1 - phi^2``,
    ``1 - h^2`` and the squared norms at 0. Rows are independent (row i
    reads and writes only ``phi_hat[i]``), so they are computed in parallel.

    Args:
      gramian: ``[K, K]``.
      phi_hat: ``[K, K]`` targets (zeros for a fresh instance).
      orders: ``[K, K-1]`` ints, row i the other tasks in visiting order
        (torchjd's ``randperm(K-1)`` row p gives ``others_i[p]``, with
        ``others_i = [j for j in range(K) if j != i]``).
      beta: EMA rate in ``[0, 1]`` (static).
      eps: non-negative denominator guard (static).

    Returns:
      ``(weights [K], phi_hat [K, K])``.
    """
    g = jnp.asarray(gramian)
    k = g.shape[0]
    orders = _check_orders(orders, k)
    phi_hat = _check_phi_hat(phi_hat, k, g.dtype)
    eye = jnp.eye(k, dtype=g.dtype)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))

    def row(i: jax.Array, order: jax.Array, hats: jax.Array) -> tuple[jax.Array, jax.Array]:
        def visit(carry, j):
            c, cg, hats = carry
            norm_i = jnp.sqrt(jnp.maximum(jnp.sum(cg * c), 0.0))
            phi = _ratio(cg[j], norm_i * norms[j] + eps)
            w = _correction(norm_i, norms[j], phi, hats[j], eps)
            # cg is advanced by w G_j rather than recomputed as c G, as the reference does.
            c, cg = c + w * eye[j], cg + w * g[j]
            return (c, cg, hats.at[j].set((1.0 - beta) * hats[j] + beta * phi)), None

        (c, _, hats), _ = jax.lax.scan(visit, (eye[i], g[i], hats), order)
        return c, hats

    coeffs, new_hat = jax.vmap(row)(jnp.arange(k), orders, phi_hat)
    return jnp.sum(coeffs, axis=0), new_hat


def gradvac_direction_libmtl(
    jacobian: Any, phi_hat: Any, orders: Any, *, beta: float = 0.5, eps: float = 1e-8
) -> tuple[jax.Array, jax.Array]:
    """LibMTL's GradVac (``GradVac_group_type=0``) on the gradient vectors: ``(d [n], phi_hat [K, K])``.

    The same rule as :func:`gradvac_weights`, computed as LibMTL (git
    4336804, ``LibMTL/weighting/GradVac.py``) computes it: the corrected
    vector ``g_i^PC`` itself is tracked, and its norm and inner products are
    taken from it. LibMTL does not clamp ``1 - rho^2`` (only rounding could
    make it negative, giving NaN there); torchjd's clamps at 0 are applied
    here, so the two agree wherever LibMTL is finite.
    """
    j = check_jacobian(jacobian)
    k = j.shape[0]
    orders = _check_orders(orders, k)
    phi_hat = _check_phi_hat(phi_hat, k, j.dtype)
    norms = jnp.linalg.norm(j, axis=1)
    hi = jax.lax.Precision.HIGHEST

    def row(i: jax.Array, order: jax.Array, hats: jax.Array) -> tuple[jax.Array, jax.Array]:
        def visit(carry, t):
            pc, hats = carry
            norm_i = jnp.linalg.norm(pc)
            phi = _ratio(jnp.dot(pc, j[t], precision=hi), norm_i * norms[t] + eps)
            w = _correction(norm_i, norms[t], phi, hats[t], eps)
            return (pc + w * j[t], hats.at[t].set((1.0 - beta) * hats[t] + beta * phi)), None

        (pc, hats), _ = jax.lax.scan(visit, (j[i], hats), order)
        return pc, hats

    pcs, new_hat = jax.vmap(row)(jnp.arange(k), orders, phi_hat)
    return jnp.sum(pcs, axis=0), new_hat


def random_other_orders(key: jax.Array, k: int) -> jax.Array:
    """``[K, K-1]`` ints: row i the K-1 tasks other than i, in a random order."""
    others = jnp.array([[t for t in range(k) if t != i] for i in range(k)], dtype=jnp.int32).reshape(k, k - 1)
    perms = jax.vmap(lambda kk: jax.random.permutation(kk, k - 1))(jax.random.split(key, k))
    return jnp.take_along_axis(others, perms, axis=1)


def gradvac(*, beta: float = 0.5, eps: float = 1e-8, convention: str = "torchjd") -> Aggregator:
    """GradVac (Wang et al. 2021, ICLR, arXiv:2010.05874), stateful.

    ``state = agg.init(K, n, dtype)`` (zero targets); ``d, state =
    agg.update(J, state, key=key)`` draws, for every row i, a random order of
    the other rows from ``key`` and applies :func:`gradvac_weights`.

    Conventions:

    * ``"torchjd"`` (default): torchjd 0.18.0 ``GradVac(beta=0.5, eps=1e-8)``,
      in Gramian form; ``d = weights @ J``.
    * ``"libmtl"``: LibMTL's ``GradVac`` with ``GradVac_group_type=0`` (the
      whole model as one group; ``GradVac_beta`` is ``beta``, and LibMTL's
      fixed 1e-8 is ``eps``), on the vectors
      (:func:`gradvac_direction_libmtl`). LibMTL's returned weights are
      always ones and do not describe its update; only the update is given.
      LibMTL's per-layer groupings (``group_type`` 1, 2) are not provided.

    Non-finite input: if J (hence its Gramian) has a NaN or infinite entry,
    the update is computed as usual (and is NaN), but the state is returned
    unchanged, so later steps are not poisoned (torchjd's targets would stay
    NaN forever).

    Args:
      beta: EMA rate of the targets, in ``[0, 1]``.
      eps: non-negative guard added to both denominators.
      convention: ``"torchjd"`` or ``"libmtl"``.

    Returns:
      A stateful :class:`Aggregator` named ``"gradvac"`` that needs ``key``.
    """
    b = check_float(beta, "beta", low=0.0, high=1.0)
    e = check_float(eps, "eps", low=0.0)
    check_choice(convention, "convention", GRADVAC_CONVENTIONS)

    def init(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> GradVacState:
        del dim
        return GradVacState(phi_hat=jnp.zeros((num_tasks, num_tasks), dtype))

    def update(jacobian: Any, state: GradVacState, *, losses: Any = None, key: Any = None):
        del losses
        j = check_jacobian(jacobian)
        k = j.shape[0]
        if not isinstance(state, GradVacState):
            raise TypeError(f"`state` must be the GradVacState from `init`, got {type(state).__name__}.")
        phi = _check_phi_hat(state.phi_hat, k, j.dtype)
        orders = random_other_orders(check_key(key, "gradvac"), k)
        if convention == "libmtl":
            d, new_phi = gradvac_direction_libmtl(j, phi, orders, beta=b, eps=e)
        else:
            w, new_phi = gradvac_weights(gramian_of(j), phi, orders, beta=b, eps=e)
            d = combine_rows(w, j)
        new_phi = jnp.where(all_finite(j), new_phi, phi)
        return d, GradVacState(phi_hat=new_phi.astype(state.phi_hat.dtype))

    return Aggregator(name="gradvac", init=init, update=update, stateful=True, needs_key=True)


AGGREGATORS = {"gradvac": gradvac}
