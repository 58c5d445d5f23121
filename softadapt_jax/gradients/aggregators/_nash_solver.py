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
        centred = decrement < 1e-6
        t_new = jnp.where(centred, t * _BARRIER_GROWTH, t)
        done = centred & (t >= t_final)
        return i + 1, t_new, b_new, done

    _, _, b, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0), t0, b0, jnp.asarray(False)))
    v0 = start.b / jnp.sum(start.b)
    ray = unbounded_direction(gn, c, jnp.where(start.feasible, v0, jnp.full_like(v0, 1.0 / k)))
    bounded = (jnp.sum(b) < 0.5 * cap) & ~ray
    solved = start.feasible & bounded & jnp.all(jnp.isfinite(b))
    return SubproblemResult(b=b, solved=solved)
