"""Jittable solvers for Nash-MTL: the bargaining equation and the convex subproblem of its CCP.

Nash-MTL (Navon et al. 2022) looks for ``alpha > 0`` with ``G alpha = 1 / alpha``
(the Nash bargaining solution, ``G = J J^T``). The released code, which torchjd
and LibMTL keep, approaches it by a concave-convex procedure: from the current
point ``a0`` it solves, with cvxpy/ECOS, the convex problem::

    min_a  c^T a   s.t.  a_i (G a)_i >= 1  (i.e. log a_i + log (G a)_i >= 0),  a >= 0,
    c = Gn 1 + (1 / a0 + Gn (1 / (Gn a0))) / nf,    Gn = G / nf,  nf = ||G||_F,

and repeats from its solution. Everything here works on ``b = sqrt(nf) a``, for
which the constraints read ``b_i (Gn b)_i >= 1``: the same problem, of unit scale
whatever the size of ``J``.

* :func:`bargaining_point` minimises the strictly convex, self-concordant
  ``f(b) = b^T Gn b / 2 - sum log b`` (gradient ``Gn b - 1/b``) by damped Newton.
  A minimiser exists exactly when the subproblem is feasible (some ``b > 0``
  has ``Gn b > 0``); when none exists (a zero row, ``g`` and ``-g``, rows
  summing to zero) the iterates run off and ``feasible`` is False.
* :func:`ccp_subproblem` solves the convex problem by a log-barrier method
  (damped Newton centring, barrier weight raised geometrically) started at
  ``2 b*``, which is strictly feasible. A cap ``sum b <= R`` (``R`` far beyond
  every point of the problem's scale) keeps the centring problems bounded;
  the subproblem counts as unbounded when :func:`unbounded_direction` finds a
  recession direction ``v >= 0``, ``Gn v >= 0`` with ``c^T v < 0`` (a small LP,
  solved by its own barrier method from the strictly feasible ``b* / sum b*``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST

# The cap on sum(b) is this many times sum(2 b*): a bounded subproblem's solution
# lies at the problem's own scale, orders of magnitude inside it.
_BOX_FACTOR = 1e6
_NEWTON_CAP = 200  # damped Newton steps for the bargaining point
_BARRIER_CAP = 600  # Newton steps, all barrier stages together
_BARRIER_GROWTH = 8.0  # the barrier weight t is multiplied by this at each stage


def _mv(m: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.matmul(m, v, precision=_HI)


def _tol(dtype) -> float:
    # Relative accuracy the solvers aim at: a few hundred ulps (about 1e-13 in
    # float64, 3e-5 in float32), below ECOS's own tolerances in float64.
    return float(jnp.finfo(dtype).eps) * 500.0


class BargainingPoint(NamedTuple):
    """Result of :func:`bargaining_point`."""

    b: jax.Array  # [K] the point reached (the minimiser of f when feasible)
    feasible: jax.Array  # bool []: ``b (Gn b) == 1`` was reached to the solver tolerance


def bargaining_point(gn: jax.Array) -> BargainingPoint:
    """``b > 0`` with ``gn b = 1 / b`` (damped Newton on ``b^T gn b / 2 - sum log b``).

    Args:
      gn: ``[K, K]`` symmetric PSD matrix (the Gramian divided by its Frobenius norm).

    Returns:
      :class:`BargainingPoint`; ``feasible`` is False when no solution exists
      (then ``f`` is unbounded below and ``b`` is the last iterate).
    """
    k = gn.shape[0]
    dtype = gn.dtype
    tol = _tol(dtype)

    def newton(b):
        grad = _mv(gn, b) - 1.0 / b
        hess = gn + jnp.diag(1.0 / (b * b))
        step = jnp.linalg.solve(hess, grad)
        decrement = jnp.sqrt(jnp.maximum(jnp.dot(grad, step), 0.0))
        return step, decrement

    def cond(carry):
        i, b, decrement = carry
        return (i < _NEWTON_CAP) & (decrement > tol) & jnp.all(jnp.isfinite(b))

    def body(carry):
        i, b, _ = carry
        step, decrement = newton(b)
        # Damped Newton (1 / (1 + decrement)) for a self-concordant function: it
        # stays inside b > 0 and converges from any start; full steps once close.
        damp = jnp.where(decrement < 0.25, 1.0, 1.0 / (1.0 + decrement))
        b_new = b - damp * step
        b_new = jnp.where(b_new > 0, b_new, b * 0.5)
        return i + 1, b_new, decrement

    b0 = jnp.ones((k,), dtype)
    _, b, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0), b0, jnp.asarray(jnp.inf, dtype)))
    residual = jnp.max(jnp.abs(b * _mv(gn, b) - 1.0))
    feasible = jnp.all(jnp.isfinite(b)) & (residual < jnp.sqrt(tol))
    return BargainingPoint(b=b, feasible=feasible)


def unbounded_direction(gn: jax.Array, c: jax.Array, v0: jax.Array) -> jax.Array:
    """Whether ``min c^T v  s.t.  v >= 0, gn v >= 0, sum v = 1`` is negative (bool []).

    A feasible ``v`` with ``c^T v < 0`` is a ray along which the CCP
    subproblem's objective decreases without bound. Barrier method on
    ``t c^T v - sum log v - sum log (gn v)`` with the equality constraint
    eliminated in the Newton step; it stops as soon as the sign is certain.

    Args:
      gn: ``[K, K]`` normalised Gramian.
      c: ``[K]`` objective.
      v0: ``[K]`` strictly feasible start (``v0 > 0``, ``gn v0 > 0``, ``sum v0 = 1``).
    """
    dtype = gn.dtype
    k = gn.shape[0]
    m = 2.0 * k  # number of inequality constraints
    scale = jnp.sum(jnp.abs(c))
    margin = _tol(dtype) * scale

    def body(carry):
        i, t, v, _ = carry
        gv = _mv(gn, v)
        grad = t * c - 1.0 / v - _mv(gn, 1.0 / gv)
        gs = gn / gv[None, :]
        hess = jnp.diag(1.0 / (v * v)) + jnp.matmul(gs, gs.T, precision=_HI)
        hinv_g = jnp.linalg.solve(hess, jnp.stack([grad, jnp.ones_like(grad)], axis=1))
        w = -jnp.sum(hinv_g[:, 0]) / jnp.sum(hinv_g[:, 1])
        step = -(hinv_g[:, 0] + w * hinv_g[:, 1])
        decrement = jnp.sqrt(jnp.maximum(-jnp.dot(grad, step), 0.0))
        v_new = v + step / (1.0 + decrement)  # damped step: stays strictly feasible
        t_new = jnp.where(decrement < 0.2, t * 4.0, t)
        return i + 1, t_new, v_new, decrement

    def cond(carry):
        i, t, v, decrement = carry
        value = jnp.dot(c, v)
        negative = value < -margin
        positive = (decrement < 0.2) & (value - 2.0 * m / t > margin)
        return (i < _BARRIER_CAP) & ~negative & ~positive & jnp.all(jnp.isfinite(v))

    t0 = 1.0 / jnp.maximum(scale, jnp.finfo(dtype).tiny)
    _, _, v, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0), t0, v0, jnp.asarray(jnp.inf, dtype)))
    return jnp.dot(c, v) < -margin


class SubproblemResult(NamedTuple):
    """Result of :func:`ccp_subproblem`."""

    b: jax.Array  # [K] the minimiser (in b = sqrt(nf) a units)
    solved: jax.Array  # bool []: feasible, finite data and bounded


def ccp_subproblem(gn: jax.Array, c: jax.Array, start: BargainingPoint) -> SubproblemResult:
    """``argmin c^T b  s.t.  log b_i + log (gn b)_i >= 0`` by a log-barrier method.

    Args:
      gn: ``[K, K]`` normalised Gramian.
      c: ``[K]`` linear objective (finite; the caller checks).
      start: the bargaining point of ``gn``; ``2 b*`` is strictly feasible.

    When the bargaining point itself is optimal (the KKT multipliers of its
    active constraints are positive, the usual case: the CCP's fixed point),
    it is returned without the barrier method.

    Returns:
      :class:`SubproblemResult`; ``solved`` is False when the problem is
      infeasible (no bargaining point) or unbounded (the solution presses
      against the cap on ``sum b``).
    """
    at_start = start.feasible & _optimal_at_bargaining_point(gn, c, start.b)
    return jax.lax.cond(
        at_start,
        lambda: SubproblemResult(b=start.b, solved=jnp.asarray(True)),
        lambda: _barrier_subproblem(gn, c, start),
    )


def _optimal_at_bargaining_point(gn: jax.Array, c: jax.Array, b: jax.Array) -> jax.Array:
    """Whether the bargaining point ``b`` solves ``min c^T b  s.t.  h_i(b) >= 0`` (bool []).

    Every constraint ``h_i = log b_i + log (gn b)_i`` is active at ``b``, so
    it is optimal exactly when ``c = sum_i lambda_i grad h_i(b)`` with
    ``lambda >= 0`` (KKT; the problem is convex). With ``lambda > 0`` the
    Lagrangian is strictly convex, so ``b`` is the unique solution. One
    ``K x K`` solve, instead of the barrier method and the ray test.
    """
    dh = jnp.diag(1.0 / b) + gn / _mv(gn, b)[None, :]  # column i is grad h_i
    multipliers = jnp.linalg.solve(dh, c)
    return jnp.all(multipliers > 0) & jnp.all(jnp.isfinite(multipliers))


def _barrier_subproblem(gn: jax.Array, c: jax.Array, start: BargainingPoint) -> SubproblemResult:
    """:func:`ccp_subproblem` when the bargaining point is not its solution."""
    dtype = gn.dtype
    tol = _tol(dtype)
    k = gn.shape[0]
    b0 = jnp.where(start.feasible, 2.0 * start.b, jnp.ones_like(start.b))
    cap = _BOX_FACTOR * jnp.sum(b0)

    def parts(b):
        gb = _mv(gn, b)
        h = jnp.log(b) + jnp.log(gb)
        slack = cap - jnp.sum(b)
        return gb, h, slack

    def barrier(t, b):
        _, h, slack = parts(b)
        ok = jnp.all(b > 0) & jnp.all(h > 0) & (slack > 0)
        val = t * jnp.dot(c, b) - jnp.sum(jnp.log(jnp.where(ok, h, 1.0))) - jnp.log(jnp.where(ok, slack, 1.0))
        return jnp.where(ok, val, jnp.inf)

    def newton(t, b):
        gb, h, slack = parts(b)
        # grad h_i = e_i / b_i + gn[:, i] / (gn b)_i
        dh = jnp.diag(1.0 / b) + gn / gb[None, :]  # column i is grad h_i
        grad = t * c - _mv(dh, 1.0 / h) + 1.0 / slack
        # Hessian of -log h_i = grad h grad h^T / h^2 - hess h / h, with
        # -hess h_i = e_i e_i^T / b_i^2 + gn_i gn_i^T / (gn b)_i^2 (PSD).
        outer = jnp.matmul(dh * (1.0 / h**2)[None, :], dh.T, precision=_HI)
        curv_self = jnp.diag(1.0 / (h * b * b))
        gs = gn / gb[None, :]
        curv_g = jnp.matmul(gs * (1.0 / h)[None, :], gs.T, precision=_HI)
        hess = outer + curv_self + curv_g + jnp.full((k, k), 1.0 / slack**2, dtype)
        step = jnp.linalg.solve(hess, grad)
        decrement = jnp.sqrt(jnp.maximum(jnp.dot(grad, step), 0.0))
        return step, decrement

    t0 = 1.0 / jnp.maximum(jnp.abs(jnp.dot(c, b0)), jnp.finfo(dtype).tiny)
    # (K + 1) / t bounds the objective gap of the barrier's centre.
    t_final = (k + 1.0) / (tol * jnp.maximum(jnp.abs(jnp.dot(c, b0)), jnp.finfo(dtype).tiny))

    def cond(carry):
        i, _, _, done = carry
        return (i < _BARRIER_CAP) & ~done

    def body(carry):
        i, t, b, _ = carry
        step, decrement = newton(t, b)
        f0 = barrier(t, b)
        slope = -(decrement**2)

        # Backtracking line search inside the domain (Armijo, halving).
        def ls_cond(s):
            return (barrier(t, b - s * step) > f0 + 0.25 * s * slope) & (s > 1e-12)

        s = jax.lax.while_loop(ls_cond, lambda s: s * 0.5, jnp.asarray(1.0, dtype))
        b_new = jnp.where(jnp.isfinite(barrier(t, b - s * step)), b - s * step, b)
        # Centred, or no step decreases the barrier beyond its rounding (in float32 that
        # happens before the decrement is small): the next stage, and the polish, go on from here.
        centred = (decrement < 1e-6) | ~(barrier(t, b_new) < f0)
        t_new = jnp.where(centred, t * _BARRIER_GROWTH, t)
        done = centred & (t >= t_final)
        return i + 1, t_new, b_new, done

    _, t, b, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0), t0, b0, jnp.asarray(False)))
    b = _polish_kkt(gn, c, b, t)
    v0 = start.b / jnp.sum(start.b)
    ray = unbounded_direction(gn, c, jnp.where(start.feasible, v0, jnp.full_like(v0, 1.0 / k)))
    bounded = (jnp.sum(b) < 0.5 * cap) & ~ray
    solved = start.feasible & bounded & jnp.all(jnp.isfinite(b))
    return SubproblemResult(b=b, solved=solved)


_POLISH_STEPS = 6  # Newton steps on one active set: quadratic convergence from the barrier's point


def _polish_kkt(gn: jax.Array, c: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    """The barrier's point ``b`` refined by Newton's method on the KKT conditions of an active set.

    The barrier method compares values of the barrier, so it cannot place
    ``b`` closer than the square root of their rounding (about 1e-3 in
    float32), and the CCP's next subproblem, hence the point it converges to,
    depends on that. With the active set ``A`` fixed, the conditions
    ``c = sum_{i in A} lam_i grad h_i(b)``, ``h_A(b) = 0`` are solved by
    Newton's method on ``(b, lam_A)``, which works on gradients and reaches
    the precision of the dtype. ``A`` starts as ``{i: h_i < t^-1/2}`` (a
    barrier point has ``h_i`` about ``1 / (t lam_i)``); a set whose solution
    has a negative multiplier loses it, one that violates an inactive
    constraint gains the most violated, for at most ``2 K`` sets. The result
    is kept only when it is a KKT point (finite, ``lam_A >= 0``, ``h >= 0``,
    residuals at rounding level); otherwise ``b`` is returned.
    """
    k = gn.shape[0]
    dtype = gn.dtype
    slack = 64.0 * k * jnp.finfo(dtype).eps
    scale = jnp.max(jnp.abs(c))

    def parts(v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        gv = _mv(gn, v)
        gs = gn / gv[None, :]  # column i: gn_i / (gn v)_i
        return jnp.log(v) + jnp.log(gv), jnp.diag(1.0 / v) + gs, gs  # h, grad h (columns), gs

    def solve_set(on: jax.Array) -> tuple[jax.Array, jax.Array]:
        a = on.astype(dtype)
        h0, _, _ = parts(b)
        lam0 = a / (t * jnp.where(on, jnp.maximum(h0, slack), 1.0))

        def newton(_: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            v, lam = carry
            h, dh, gs = parts(v)
            lam_a = lam * a
            # Hessian of the Lagrangian c^T b - sum lam_i h_i (PSD: every h_i is concave).
            hess = jnp.diag(lam_a / (v * v)) + jnp.matmul(gs * lam_a[None, :], gs.T, precision=_HI)
            dha = dh * a[None, :]
            kkt = jnp.block([[hess, -dha], [-dha.T, jnp.diag(1.0 - a)]])
            rhs = -jnp.concatenate([c - _mv(dh, lam_a), -h * a])
            step = jnp.linalg.solve(kkt, rhs)
            return v + step[:k], (lam + step[k:]) * a

        return jax.lax.fori_loop(0, _POLISH_STEPS, newton, (b, lam0))

    def check(on: jax.Array, v: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        h, dh, _ = parts(v)
        negative = on & (lam < -slack * scale)
        violated = ~on & (h < -slack)
        ok = (
            jnp.all(jnp.isfinite(v))
            & jnp.all(jnp.isfinite(lam))
            & jnp.all(v > 0)
            & ~jnp.any(negative)
            & ~jnp.any(violated)
            & jnp.all(jnp.abs(c - _mv(dh, lam)) <= slack * scale)
            & jnp.all(jnp.where(on, jnp.abs(h) <= slack, True))
        )
        return ok, negative, jnp.where(violated, h, jnp.inf)

    def cond(carry: tuple) -> jax.Array:
        it, _, _, ok = carry
        return (it < 2 * k) & ~ok

    def body(carry: tuple) -> tuple:
        it, on, _, _ = carry
        v, lam = solve_set(on)
        ok, negative, violation = check(on, v, lam)
        entering = (jnp.arange(k) == jnp.argmin(violation)) & jnp.isfinite(jnp.min(violation))
        on_next = jnp.where(jnp.any(negative), on & ~negative, on | entering)
        return it + 1, jnp.where(ok, on, on_next), v, ok

    h_b, _, _ = parts(b)
    on0 = h_b < jax.lax.rsqrt(t)
    _, _, v, ok = jax.lax.while_loop(cond, body, (jnp.asarray(0), on0, b, jnp.asarray(False)))
    return jnp.where(ok, v, b)
