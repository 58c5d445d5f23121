"""An exact, jittable solver of the small dense QP behind UPGrad and DualProj.

The problem is ``min_v 1/2 v^T A v  s.t.  v >= u`` with ``A [K, K]`` symmetric
positive definite. With ``v = u + x`` it is the linear complementarity problem

    lam = q + A x,   x >= 0,   lam >= 0,   x^T lam = 0,   q = A u,

whose solution is unique for a positive definite ``A``. It is found by block
principal pivoting (Judice & Pires 1994, "A block principal pivoting
algorithm for large-scale strictly monotone linear complementarity
problems"): guess the set F of free coordinates (``x_F > 0``), solve
``A_FF x_F = -q_F`` exactly, and move every coordinate that violates a sign
condition to the other set; when that stops reducing the number of
violations for a few rounds, move only the violating coordinate of largest
index (Murty's rule), which cannot cycle. Like quadprog's active-set method
(the solver torchjd calls), the result is the solution of one linear system
on the optimal active set, so it is exact up to the rounding of that solve
(about ``cond(A_FF)`` machine epsilons, relative), not up to an iterative
tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softadapt_jax.gradients.aggregators._linalg import spd_solve

# Rounds of "flip every violation" allowed without improvement before the single-index rule.
_BLOCK_TRIES = 3


def _solve_on(a: jax.Array, q: jax.Array, free: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` with ``A_FF x_F = -q_F``, ``x_{~F} = 0``, and ``lam = q + A x``."""
    both = free[:, None] & free[None, :]
    m = jnp.where(both, a, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0).astype(a.dtype))
    # m is symmetric positive definite (a principal block of A, the identity elsewhere), so
    # elimination without pivoting is stable and compiles far faster than a batched LU.
    x = jnp.where(free, spd_solve(m, jnp.where(free, -q, 0.0)[:, None])[:, 0], 0.0)
    lam = q + jnp.matmul(a, x, precision=jax.lax.Precision.HIGHEST)
    return x, jnp.where(free, 0.0, lam)


def project_dual_cone(a: jax.Array, u: jax.Array, *, max_iters: int | None = None) -> jax.Array:
    """``argmin_v v^T A v`` subject to ``v >= u`` (elementwise), for a positive definite ``A``.

    The pivoting runs on the equilibrated problem ``D^-1 A D^-1``, ``D =
    diag(A)^(1/2)`` (in ``x_hat = D x``, ``lam_hat = D^-1 lam``): the signs it
    tests are unchanged, but every coordinate is then of the size of its
    contribution to the update, so one tolerance fits them all even when the
    rows' norms differ by orders of magnitude (a small row's multiplier is
    otherwise lost under the rounding of a large one's). The tolerance is a
    few machine epsilons of the problem's scale; if rounding makes the sign
    tests cycle, the set with the smallest violation seen is kept.

    Args:
      a: ``[K, K]`` symmetric positive definite matrix (torchjd's regularised,
        trace-normalised Gramian).
      u: ``[K]`` lower bound (the weights of the vector to project).
      max_iters: cap on the pivoting rounds (static); ``None``: ``8 K + 32``,
        far above what positive definite problems of this size take.

    Returns:
      ``v [K]``. If the linear solves give non-finite values (a singular ``A``,
      or a non-finite input) the result is ``u`` itself when ``u`` is finite.
    """
    k = a.shape[0]
    dtype = a.dtype
    cap = 8 * k + 32 if max_iters is None else int(max_iters)
    diag = jnp.diagonal(a)
    d = jnp.sqrt(jnp.where((diag > 0) & jnp.isfinite(diag), diag, 1.0))
    a_hat = a / (d[:, None] * d[None, :])
    q_hat = jnp.matmul(a, u, precision=jax.lax.Precision.HIGHEST) / d
    eps = jnp.finfo(dtype).eps
    index = jnp.arange(k)

    def violations(free: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x, lam = _solve_on(a_hat, q_hat, free)
        # The rounding of lam_hat = q_hat + A_hat x_hat and of x_hat's solve, both on the
        # equilibrated scale (unit diagonal): a coordinate zero in exact arithmetic stays
        # within it and must not count as a violation.
        scale = jnp.max(jnp.abs(q_hat)) + jnp.max(jnp.abs(x))
        tol = 16.0 * k * eps * jnp.where(scale > 0, scale, 1.0)
        value = jnp.where(free, x, lam)
        bad = (value < -tol) | ~jnp.isfinite(value)
        worst = jnp.max(jnp.where(jnp.isfinite(value), jnp.maximum(-value, 0.0), jnp.inf))
        return bad, jnp.sum(bad), worst

    def cond(carry: tuple) -> jax.Array:
        it, _, _, count, *_ = carry
        return (it < cap) & (count > 0)

    def body(carry: tuple) -> tuple:
        it, free, bad, count, best, tries, kept, kept_worst = carry
        improved = count < best
        block = improved | (tries > 0)
        last = jnp.max(jnp.where(bad, index, -1))
        flip = jnp.where(block, bad, index == last)
        free = free ^ flip
        tries = jnp.where(improved, _BLOCK_TRIES, jnp.where(block, tries - 1, tries))
        best = jnp.minimum(best, count)
        bad, count, worst = violations(free)
        better = worst < kept_worst
        kept = jnp.where(better, free, kept)
        return it + 1, free, bad, count, best, tries, kept, jnp.minimum(worst, kept_worst)

    # Start from "every coordinate free": the unconstrained minimiser shifted onto the bound set.
    free0 = jnp.ones((k,), bool)
    bad0, count0, worst0 = violations(free0)
    init = (jnp.asarray(0), free0, bad0, count0, jnp.asarray(k + 1), jnp.asarray(_BLOCK_TRIES), free0, worst0)
    _, free, _, count, *_, kept, _ = jax.lax.while_loop(cond, body, init)
    x_hat, _ = _solve_on(a_hat, q_hat, jnp.where(count > 0, kept, free))
    v = u + jnp.maximum(x_hat, 0.0) / d
    return jnp.where(jnp.all(jnp.isfinite(v)), v, u).astype(dtype)


def normalize_and_regularize(gramian: jax.Array, norm_eps: float, reg_eps: float) -> jax.Array:
    """torchjd's ``regularize(normalize(G, norm_eps), reg_eps)``.

    ``G / tr(G)``, or all zeros when ``tr(G) < norm_eps``; then ``reg_eps I``
    is added (after the normalisation, so the regulariser's relative weight
    does not depend on the scale of J, except below the trace threshold).
    """
    trace = jnp.trace(gramian)
    small = trace < norm_eps
    normed = jnp.where(small, 0.0, gramian / jnp.where(small, 1.0, trace))
    return normed + reg_eps * jnp.eye(gramian.shape[0], dtype=gramian.dtype)
