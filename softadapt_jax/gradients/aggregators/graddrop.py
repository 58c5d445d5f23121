"""GradDrop (Chen et al. 2020): keep, per coordinate, the gradients of one randomly chosen sign."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax._checks import as_float_array, check_choice, check_scalar
from softadapt_jax.gradients.aggregators._common import static_floats
from softadapt_jax.gradients.aggregators._core import Aggregator, check_jacobian, check_key, no_state

GRADDROP_CONVENTIONS = ("torchjd", "libmtl")
_LIBMTL_PURITY_EPS = 1e-7  # LibMTL adds it to the denominator of the sign purity


def _leak_vector(leak: Any, k: int, dtype: Any) -> jax.Array:
    if leak is None:
        return jnp.zeros((k,), dtype)
    arr = np.asarray(leak, dtype=np.float64)
    if arr.ndim == 0:
        return jnp.full((k,), float(arr), dtype)
    if arr.shape != (k,):
        raise ValueError(
            f"`leak` must be None, a scalar or a vector of K = {k} values, got shape {arr.shape}."
        )
    return jnp.asarray(arr, dtype)


def _check_leak(leak: Any) -> Any:
    arr = static_floats(leak, "leak", "None, a number or a vector of numbers")
    if arr is None:
        return None
    if arr.ndim > 1 or not np.all(np.isfinite(arr)):
        raise ValueError(f"`leak` must be None, a finite scalar or a finite 1-D vector, got {leak!r}.")
    return arr


# Up to this many rows the column sums are written row by row, which XLA fuses
# into one pass over J with no [K, n] temporary; beyond it, as reductions.
_UNROLL_MAX_ROWS = 64


def _signed_column_sums(j: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum_k max(J_k, 0), sum_k min(J_k, 0))``, each ``[n]``; NaN entries propagate."""
    if j.shape[0] > _UNROLL_MAX_ROWS:
        return jnp.sum(jnp.maximum(j, 0.0), axis=0), jnp.sum(jnp.minimum(j, 0.0), axis=0)
    rows = [j[r] for r in range(j.shape[0])]
    return sum(jnp.maximum(x, 0.0) for x in rows), sum(jnp.minimum(x, 0.0) for x in rows)


def _row_sum(weights: jax.Array, rows: jax.Array) -> jax.Array:
    # Elementwise, not a matmul: a zero weight must still turn an inf entry into NaN.
    return jnp.sum(weights[:, None] * rows, axis=0)


def _masks(signed: jax.Array, purity: jax.Array, uniforms: jax.Array) -> jax.Array:
    """``M_k = [P > U][s_k > 0] + [P < U][s_k < 0]`` per column (exclusive, so a 0/1 mask)."""
    keep_pos = (purity > uniforms)[None, :] & (signed > 0)
    keep_neg = (purity < uniforms)[None, :] & (signed < 0)
    return (keep_pos | keep_neg).astype(signed.dtype)


def graddrop_direction(
    jacobian: Any,
    uniforms: Any,
    *,
    leak: Any = None,
    f: Callable[[jax.Array], jax.Array] | None = None,
    convention: str = "torchjd",
) -> jax.Array:
    """GradDrop's update for ``J [K, n]`` and the uniform draws ``U [n]``.

    Per column c, the sign purity ``P_c = (1 + sum_k J_kc / (sum_k |J_kc| + e)) / 2``
    is the share of positive gradient mass; with probability ``f(P_c)`` the
    positive entries of the column are kept, otherwise the negative ones::

        M_kc = [f(P_c) > U_c][J_kc > 0] + [f(P_c) < U_c][J_kc < 0]
        d_c  = sum_k (leak_k + (1 - leak_k) M_kc) J_kc

    Conventions: ``"torchjd"`` reproduces torchjd 0.18.0
    ``torchjd/aggregation/_graddrop.py`` (``GradDrop``, ``e = 0``; an all-zero
    column, where torchjd's ``P`` is 0/0, gets ``P = 1/2`` here, and its
    update is 0 in both); ``"libmtl"`` applies LibMTL's rule (git 4336804,
    ``LibMTL/weighting/GradDrop.py``, ``e = 1e-7``, ``f`` the identity) to
    the rows of J as they are; LibMTL itself applies it to representation
    gradients only, see :func:`graddrop_rep_grad`. A NaN entry of J makes its
    column's update NaN.

    Args:
      jacobian: ``[K, n]``.
      uniforms: ``[n]`` draws in ``[0, 1)`` (torchjd's ``torch.rand(n)``).
      leak: ``None`` (0), a scalar, or ``[K]`` per-row leaks.
      f: monotone map applied to the purity, jittable (``None``: identity).
      convention: ``"torchjd"`` (default) or ``"libmtl"``.

    Returns:
      ``d [n]``.
    """
    check_choice(convention, "convention", GRADDROP_CONVENTIONS)
    j = check_jacobian(jacobian)
    k, n = j.shape
    u = as_float_array(uniforms, "uniforms")
    if u.shape != (n,):
        raise ValueError(
            f"`uniforms` must have shape ({n},) (one draw per column of the jacobian), got {tuple(u.shape)}."
        )
    leak_ = _check_leak(leak)
    # A column's kept entries are all its positive or all its negative ones, so
    # the update needs only the two signed column sums, not a [K, n] mask.
    # maximum/minimum (not where) carry a NaN entry into both sums.
    pos_sum, neg_sum = _signed_column_sums(j)
    total, mass = pos_sum + neg_sum, pos_sum - neg_sum
    if convention == "libmtl":
        purity = 0.5 * (1.0 + total / (mass + _LIBMTL_PURITY_EPS))
    else:
        purity = jnp.where(mass > 0, 0.5 * (1.0 + total / jnp.where(mass > 0, mass, 1.0)), 0.5)
    if f is not None:
        purity = f(purity)
    u = u.astype(j.dtype)
    if leak_ is None:
        kept_pos, kept_neg, leaked = pos_sum, neg_sum, 0.0 * total
    else:
        lk = _leak_vector(leak_, k, j.dtype)
        kept_pos = _row_sum(1.0 - lk, jnp.maximum(j, 0.0))
        kept_neg = _row_sum(1.0 - lk, jnp.minimum(j, 0.0))
        leaked = _row_sum(lk, j)
    # ``leaked`` carries a non-finite column into the update (0 * inf = NaN),
    # as the mask-weighted sum did.
    return leaked + jnp.where(purity > u, kept_pos, jnp.where(purity < u, kept_neg, 0.0))


def graddrop_rep_grad(per_task_rep_grads: Any, rep: Any, uniforms: Any, *, leak: Any = 0.0) -> jax.Array:
    """LibMTL's GradDrop on representation gradients: the gradient to back-propagate through ``rep``.

    LibMTL (git 4336804, ``LibMTL/weighting/GradDrop.py``, ``rep_grad=True``)
    signs each task's gradient by the representation and sums over the
    batch, ``s_k = sum_b grad_k[b] * sign(rep[b])`` ``[K, d]``, forms the
    purity ``P = (1 + sum_k s_k / (sum_k |s_k| + 1e-7)) / 2``, draws
    ``U [d]`` and builds one mask per task and feature, shared over the
    batch, ``M_k = [P > U][s_k > 0] + [P < U][s_k < 0]``; the result is
    ``sum_k grad_k * (leak + (1 - leak) M_k)`` ``[B, d]``. The encoder's
    gradient is then its VJP (``result^T x`` for a linear encoder).

    Args:
      per_task_rep_grads: ``[K, B, d]``, each task's gradient w.r.t. the
        representation.
      rep: ``[B, d]``, the representation (only its sign is used).
      uniforms: ``[d]`` draws (LibMTL's ``torch.rand_like(P)``).
      leak: LibMTL's ``leak`` (a scalar, may be traced; default 0).

    Returns:
      ``[B, d]``.
    """
    grads = as_float_array(per_task_rep_grads, "per_task_rep_grads")
    if grads.ndim != 3:
        raise ValueError(f"`per_task_rep_grads` must be [K, B, d], got shape {tuple(grads.shape)}.")
    r = as_float_array(rep, "rep")
    if r.shape != grads.shape[1:]:
        raise ValueError(f"`rep` must have shape {tuple(grads.shape[1:])} (B, d), got {tuple(r.shape)}.")
    u = as_float_array(uniforms, "uniforms")
    if u.shape != grads.shape[2:]:
        raise ValueError(f"`uniforms` must have shape ({grads.shape[2]},), got {tuple(u.shape)}.")
    lk = check_scalar(leak, "leak").astype(grads.dtype)
    signed = jnp.sum(grads * jnp.sign(r)[None], axis=1)
    purity = 0.5 * (1.0 + jnp.sum(signed, axis=0) / (jnp.sum(jnp.abs(signed), axis=0) + _LIBMTL_PURITY_EPS))
    m = _masks(signed, purity, u.astype(signed.dtype))
    return jnp.sum(grads * (lk + (1.0 - lk) * m)[:, None, :], axis=0)


def graddrop(
    *,
    f: Callable[[jax.Array], jax.Array] | None = None,
    leak: Any = None,
    convention: str = "torchjd",
) -> Aggregator:
    """GradDrop, gradient sign dropout (Chen et al. 2020, arXiv:2010.06808, Alg. 1 lines 10-15).

    ``update(J, (), key=key)`` draws ``U ~ uniform[0, 1)^n`` from ``key`` and
    returns :func:`graddrop_direction`. Default: torchjd 0.18.0 ``GradDrop``
    (``f`` identity, ``leak=None``). ``convention="libmtl"``: LibMTL's
    purity (``+1e-7``) and scalar leak on the Jacobian's rows; for LibMTL's
    actual representation-gradient form use :func:`graddrop_rep_grad`.

    Args:
      f: jittable monotone map of the purity (``None``: identity).
      leak: ``None``, a scalar, or ``[K]`` per-row leaks (checked against K).
      convention: ``"torchjd"`` or ``"libmtl"``.

    Returns:
      A stateless :class:`Aggregator` named ``"graddrop"`` that needs ``key``.
    """
    check_choice(convention, "convention", GRADDROP_CONVENTIONS)
    if f is not None and not callable(f):
        raise TypeError(f"`f` must be None or a callable on the purity, got {type(f).__name__}.")
    lk = _check_leak(leak)

    def update(jacobian: Any, state: Any, *, losses: Any = None, key: Any = None) -> tuple[jax.Array, Any]:
        del losses
        j = check_jacobian(jacobian)
        u = jax.random.uniform(check_key(key, "graddrop"), (j.shape[1],), dtype=j.dtype)
        return graddrop_direction(j, u, leak=lk, f=f, convention=convention), state

    return Aggregator(name="graddrop", init=no_state, update=update, needs_key=True)


AGGREGATORS = {"graddrop": graddrop}
