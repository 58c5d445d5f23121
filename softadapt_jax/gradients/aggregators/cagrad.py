"""CAGrad, conflict-averse gradient descent: torchjd's and LibMTL's forms, on the Gramian.

Paper: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning"
(NeurIPS 2021, arXiv:2110.14048), Algorithm 1. With ``g0`` the mean gradient
and ``g_w = sum_k w_k g_k``, the dual

    w = argmin_{w in simplex}  <g_w, g0> + sqrt(phi) ||g_w||,   sqrt(phi) = c ||g0||

gives the update ``d = (g0 + sqrt(phi) / ||g_w|| g_w) / rescale``. Conventions:

* ``"torchjd"`` (this registry's default): torchjd 0.18.0
  ``torchjd/aggregation/_cagrad.py`` (``CAGradWeighting``): the Gramian is
  divided by its trace (all zeros below ``norm_eps``), no other guard, all-zero
  weights where ``||g_w|| < norm_eps`` (Pareto-stationary), no rescaling.
* ``"libmtl"``: LibMTL git 4336804 ``LibMTL/weighting/CAGrad.py`` (the
  authors' code, Cranial-XIX/CAGrad): the raw Gramian with its 1e-8 guards,
  ``rescale="1+c^2"`` by default; the default of
  :func:`softadapt_jax.gradients.cagrad`.

Both references solve the dual with a non-jittable solver (cvxpy/CLARABEL,
scipy's SLSQP); here a log-barrier interior-point method on the Gramian solves
the same convex problem to a duality gap of ``tol`` (1e-12), so the
references' own stopping tolerances bound the agreement.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax._checks import check_choice, check_float, check_positive_int
from softadapt_jax.gradients.aggregators._core import Aggregator, from_weighting
from softadapt_jax.gradients.aggregators._linalg import spd_solve

CAGRAD_CONVENTIONS = ("torchjd", "libmtl")
CAGRAD_RESCALES = ("1+c^2", "1+c", "none")
_LIBMTL_EPS = 1e-8  # LibMTL's three guards


def _rescale(convention: str, rescale: str | None) -> str:
    """``rescale``, or the convention's own for ``None`` (``"1+c^2"`` for LibMTL, ``"none"`` for torchjd)."""
    check_choice(convention, "convention", CAGRAD_CONVENTIONS)
    if rescale is None:
        return "1+c^2" if convention == "libmtl" else "none"
    return check_choice(rescale, "rescale", CAGRAD_RESCALES)


def cagrad_dual_problem(
    gram: jax.Array, c: float | jax.Array = 0.5, *, convention: str = "libmtl", norm_eps: float = 1e-4
) -> tuple[jax.Array, jax.Array, float]:
    """The dual each convention solves: ``min_{w in simplex} w^T A b + s sqrt(w^T A w + e)``, ``b = 1/K``.

    Args:
      gram: ``[K, K]`` Gramian.
      c: the ball radius.
      convention: ``"libmtl"`` (default, as :func:`softadapt_jax.gradients.cagrad`):
        ``A = G``, ``s = c sqrt(mean(G) + 1e-8) + 1e-8``, ``e = 1e-8``;
        ``"torchjd"``: ``A = G / tr(G)`` (zeros when ``tr(G) < norm_eps``),
        ``s = c sqrt(b^T A b)``, ``e = 0``.
      norm_eps: torchjd's trace threshold (static).

    Returns:
      ``(A, s, e)``.
    """
    check_choice(convention, "convention", CAGRAD_CONVENTIONS)
    c = jnp.asarray(c, gram.dtype)
    if convention == "libmtl":
        # LibMTL / the authors: every guard is absolute, on the raw Gramian.
        return gram, c * jnp.sqrt(jnp.mean(gram) + _LIBMTL_EPS) + _LIBMTL_EPS, _LIBMTL_EPS
    k = gram.shape[0]
    b = jnp.full((k,), 1.0 / k, gram.dtype)
    trace = jnp.trace(gram)
    small = trace < norm_eps
    a = jnp.where(small, 0.0, gram / jnp.where(small, 1.0, trace))
    return a, c * jnp.sqrt(jnp.maximum(b @ a @ b, 0.0)), 0.0


def cagrad_coefficients(
    gram: jax.Array,
    w: jax.Array,
    c: float | jax.Array = 0.5,
    *,
    convention: str = "libmtl",
    rescale: str | None = None,
    norm_eps: float = 1e-4,
) -> jax.Array:
    """CAGrad's coefficients from a dual solution ``w`` (:func:`cagrad_dual_problem`).

    ``coef = (1/K + lam w) / rescale`` with ``lam = s / (||g_w|| + 1e-8)``
    (``"libmtl"``, ``||g_w||^2 = w^T G w``) or ``lam = s / ||g_w||`` on the
    trace-normalised Gramian (``"torchjd"``), where torchjd returns all zeros
    when ``||g_w|| < norm_eps`` (Pareto-stationary).

    Args:
      gram: ``[K, K]`` Gramian.
      w: ``[K]`` dual weights on the simplex.
      c: the ball radius.
      convention: ``"libmtl"`` (default) or ``"torchjd"``.
      rescale: ``"1+c^2"``, ``"1+c"``, ``"none"`` or ``None`` (the convention's own).
      norm_eps: torchjd's trace and Pareto-stationary threshold (static).

    Returns:
      ``[K]`` coefficients.
    """
    rescale = _rescale(convention, rescale)
    k = gram.shape[0]
    dtype = gram.dtype
    c = jnp.asarray(c, dtype)
    w = jnp.asarray(w, dtype)
    b = jnp.full((k,), 1.0 / k, dtype)
    a, sqrt_phi, _ = cagrad_dual_problem(gram, c, convention=convention, norm_eps=norm_eps)
    gw_norm = jnp.sqrt(jnp.maximum(w @ a @ w, 0.0))
    if convention == "libmtl":
        coef = b + sqrt_phi / (gw_norm + _LIBMTL_EPS) * w
    else:
        stationary = gw_norm < norm_eps
        coef = jnp.where(stationary, 0.0, b + sqrt_phi / jnp.where(stationary, 1.0, gw_norm) * w)
    if rescale == "1+c^2":
        coef = coef / (1.0 + c**2)
    elif rescale == "1+c":
        coef = coef / (1.0 + c)
    return coef.astype(dtype)


def _coefficients(
    gram: jax.Array,
    c: float | jax.Array,
    *,
    convention: str,
    rescale: str | None = None,
    norm_eps: float = 1e-4,
    max_iters: int = 200,
    tol: float = 1e-12,
) -> jax.Array:
    """CAGrad's ``[K]`` coefficients of the convention: the dual solved, then :func:`cagrad_coefficients`.

    Accuracy: the duality gap of the dual solution is below ``tol`` (floored
    at 64 machine epsilons) on the problem divided by the largest diagonal
    entry of its Gramian. The references' solvers stop earlier: SLSQP
    (LibMTL) when the objective changes by less than 1e-6 in absolute terms
    (so it may return its starting point 1/K when the Gramian's scale is far
    from 1, where this solver returns the minimiser), CLARABEL (torchjd) at
    a relative gap of 1e-8. Where a convex combination of the gradients
    nearly vanishes, LibMTL's step ``sqrt(phi) / (||g_w|| + 1e-8)`` divides
    by about 1e-8 and its update is set by the solver's last digits.
    """
    k = gram.shape[0]
    a, sqrt_phi, guard = cagrad_dual_problem(gram, c, convention=convention, norm_eps=norm_eps)
    w = jnp.ones((1,), gram.dtype) if k == 1 else _solve_dual(a, sqrt_phi, guard, max_iters, tol)
    return cagrad_coefficients(gram, w, c, convention=convention, rescale=rescale, norm_eps=norm_eps)


def _solve_dual(gram: jax.Array, sqrt_phi: jax.Array, guard: float, max_iters: int, tol: float) -> jax.Array:
    """``argmin_{w in simplex} w^T G b + sqrt_phi sqrt(w^T G w + guard)``, ``b = 1/K``.

    A log-barrier interior-point method on the cone form of the problem:
    minimise ``t (w^T G b + sqrt_phi z) - log(z^2 - rho) - sum_i log w_i``
    with ``rho = w^T G w + guard``, ``sum(w) = 1``, raising ``t`` tenfold
    whenever the iterate is centred, until the duality gap ``(K + 2) / t`` is
    below ``tol`` (on the problem divided by the largest diagonal entry of
    ``G``). The minimisation over ``z`` has a closed form: with
    ``a = t sqrt_phi`` and ``S = sqrt(1 + a^2 rho)`` the barrier is
    ``t w^T G b + S - log(1 + S) - sum_i log w_i`` (up to a constant), which
    is smooth even where ``g_w = 0`` (the kink of the norm). Its Newton steps
    are invariant to linear changes of variables, so rows of very different
    scales do not slow it down as they do first-order methods.
    """
    k = gram.shape[0]
    dtype = gram.dtype
    b = jnp.full((k,), 1.0 / k, dtype)
    # Dividing by s = max diag(G) leaves the minimiser unchanged if sqrt_phi and the guard are
    # rescaled too: f/s = w^T G' b + sqrt_phi/sqrt(s) sqrt(w^T G' w + guard/s).
    scale = jnp.max(jnp.diag(gram))
    positive = scale > 0
    s = jnp.where(positive, scale, 1.0)
    g = gram / s
    fine = float(jnp.finfo(dtype).eps)
    # A zero radius (c = 0) would leave the cone term flat; a floor of sqrt(machine epsilon)
    # changes the objective by less than its rounding.
    sp = jnp.maximum(sqrt_phi / jnp.sqrt(s), np.sqrt(fine))
    eps = guard / s
    q = g @ b
    t_final = (k + 2) / max(tol, 64.0 * fine)
    halvings = 0.5 ** jnp.arange(40, dtype=dtype)  # candidate step lengths of the line search

    def barrier(w: jax.Array, t: jax.Array) -> jax.Array:  # w: [..., K]
        rho = jnp.maximum(jnp.einsum("...i,ij,...j->...", w, g, w) + eps, 0.0)
        root = jnp.sqrt(1.0 + (t * sp) ** 2 * rho)
        logs = jnp.sum(jnp.log(jnp.where(w > 0, w, 1.0)), axis=-1)
        value = t * (w @ q) + root - jnp.log1p(root) - logs
        return jnp.where(jnp.all(w > 0, axis=-1), value, jnp.inf)

    def newton_step(w: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        gw = g @ w
        a2 = (t * sp) ** 2
        root = jnp.sqrt(1.0 + a2 * jnp.maximum(w @ gw + eps, 0.0))
        d1 = a2 / (2.0 * (1.0 + root))  # first and second derivatives of the cone term in rho
        d2 = -(a2**2) / (4.0 * root * (1.0 + root) ** 2)
        grad = t * q + 2.0 * d1 * gw - 1.0 / w
        # A multiple of 1 in the gradient only changes the multiplier of sum(w) = 1: removing
        # the weighted mean leaves a vector that vanishes at the central point, so the step is
        # not the small difference of large terms (which jit's reassociation would spoil).
        grad = grad - w @ grad
        # Newton step on sum(w) = 1, in the variables y_i = x_i / w_i, where the barrier's
        # Hessian is I + W H W: dx = -H^-1 (grad + nu 1) with sum(dx) = 0.
        m = (2.0 * d1 * g + 4.0 * d2 * jnp.outer(gw, gw)) * jnp.outer(w, w) + jnp.eye(k, dtype=dtype)
        sol = spd_solve(m, jnp.stack([w * grad, w], axis=1)) * w[:, None]
        nu = -jnp.sum(sol[:, 0]) / jnp.sum(sol[:, 1])
        dx = -(sol[:, 0] + nu * sol[:, 1])
        return dx, -(grad @ dx)  # the step and the squared Newton decrement

    def cond(carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
        it, _, _, done = carry
        return (it < max_iters) & ~done

    def body(carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> tuple[Any, ...]:
        it, w, t, _ = carry
        dx, decrement = newton_step(w, t)
        dx = jnp.where(jnp.all(jnp.isfinite(dx)), dx, 0.0)
        # The best of the halvings of the full step; infeasible trial points have an infinite barrier.
        trial = w + halvings[:, None] * dx
        values = barrier(trial, t)
        best = jnp.argmin(values)
        current = barrier(w, t)
        gain = current - values[best]
        w = jnp.where(gain > 0, trial[best] / jnp.sum(trial[best]), w)
        # Centred: a small Newton decrement, or no gain beyond the barrier's rounding.
        centred = (decrement < 1e-9) | (gain <= 64.0 * fine * (jnp.abs(current) + 1.0))
        done = centred & (t >= t_final)
        return it + 1, w, jnp.where(centred & ~done, 10.0 * t, t), done

    init = (jnp.asarray(0), b, jnp.asarray(1.0, dtype), jnp.asarray(False))
    _, w, t, _ = jax.lax.while_loop(cond, body, init)
    w = _polish_on_face(g, q, sp, eps, w, t)
    return jnp.where(positive, w, b)


_POLISH_STEPS = 4  # Newton steps per face: quadratic convergence from the barrier's point


def _polish_on_face(
    g: jax.Array, q: jax.Array, sp: jax.Array, eps: jax.Array, w: jax.Array, t: jax.Array
) -> jax.Array:
    """The barrier's point ``w`` refined on its face of the simplex, when a KKT point is found there.

    The barrier method compares objective values, so it cannot resolve ``w``
    beyond the square root of their rounding (a few 1e-4 in float32). Here a
    support ``S`` is fixed and Newton's method solves the optimality
    conditions on its face, ``grad_S f = nu 1``, ``sum w = 1``, with full
    steps: it works on gradients, which are accurate to the precision of the
    dtype. The first support is ``{i: w_i > t^-1/2}`` (off the support a
    barrier point has ``w_i`` about ``1 / (t mu_i)``, ``mu_i`` the
    multiplier); a face whose solution has negative entries loses them, one
    whose multipliers ``grad_i - nu`` are negative off the support gains the
    most negative, for at most ``2 K`` faces (an active-set method). The
    result is kept only when it is a KKT point (finite, ``w >= 0``,
    ``grad_i = nu`` on the support and ``>= nu`` off it, to the rounding of the
    gradient); otherwise the barrier's ``w`` is returned.
    ``f = w^T q + sp sqrt(w^T g w + eps)`` as in :func:`_solve_dual`.
    """
    k = g.shape[0]
    dtype = g.dtype
    fine = jnp.finfo(dtype).eps

    def gradient(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        gw = g @ w
        r = jnp.sqrt(jnp.maximum(w @ gw + eps, 0.0))
        return q + sp * gw / r, gw, r

    def solve_face(s: jax.Array) -> jax.Array:
        def newton(_: int, v: jax.Array) -> jax.Array:
            grad, gw, r = gradient(v)
            hess = sp * (g / r - jnp.outer(gw, gw) / r**3)
            # f is flat along w itself when eps = 0; adding s s^T changes nothing on the tangent
            # space sum(d) = 0 and makes the block positive definite (elimination without pivoting).
            ss = jnp.outer(s, s)
            m = (hess + jnp.max(jnp.diag(hess)) * ss) * ss + jnp.diag(1.0 - s)
            sol = spd_solve(m, jnp.stack([grad * s, s], axis=1))
            nu = jnp.sum(sol[:, 0]) / jnp.sum(sol[:, 1])
            return v - (sol[:, 0] - nu * sol[:, 1]) * s

        start = jnp.where(jnp.sum(w * s) > 0, w * s / jnp.sum(w * s), s / jnp.sum(s))
        return jax.lax.fori_loop(0, _POLISH_STEPS, newton, start)

    def check(s: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        grad, gw, r = gradient(v)
        nu = jnp.sum(grad * s * v) / jnp.sum(s * v)
        # The rounding of the gradient, whose entries are O(1) once g has a unit diagonal.
        slack = 64.0 * k * fine * (jnp.max(jnp.abs(q)) + sp * jnp.max(jnp.abs(gw)) / r)
        on = s > 0
        negative = on & (v < -slack)
        mu = jnp.where(on, jnp.inf, grad - nu)
        ok = (
            jnp.all(jnp.isfinite(v))
            & ~jnp.any(negative)
            & jnp.all(jnp.where(on, jnp.abs(grad - nu) <= slack, mu >= -slack))
        )
        return ok, negative, mu

    def cond(carry: tuple) -> jax.Array:
        it, _, _, ok = carry
        return (it < 2 * k) & ~ok

    def body(carry: tuple) -> tuple:
        it, s, _, _ = carry
        v = solve_face(s)
        ok, negative, mu = check(s, v)
        entering = (jnp.arange(k) == jnp.argmin(mu)) & (jnp.min(mu) < 0)
        s_next = jnp.where(jnp.any(negative), s * ~negative, jnp.maximum(s, entering.astype(dtype)))
        s_next = jnp.where(jnp.sum(s_next) > 0, s_next, s)
        return it + 1, jnp.where(ok, s, s_next), v, ok

    s0 = ((w > jax.lax.rsqrt(t)) | (w == jnp.max(w))).astype(dtype)
    _, _, v, ok = jax.lax.while_loop(cond, body, (jnp.asarray(0), s0, w, jnp.asarray(False)))
    v = jnp.maximum(v, 0.0)
    return jnp.where(ok, v / jnp.sum(v), w)


def cagrad_weights(gramian: jax.Array, *, c: float, norm_eps: float = 1e-4) -> jax.Array:
    """CAGrad's weights in torchjd's form (the dual solved, then :func:`cagrad_coefficients`).

    With ``A = G / tr(G)`` (zeros when ``tr(G) < norm_eps``), ``b = 1/K`` and
    ``s = c sqrt(b^T A b)``, the dual ``w = argmin_{w in simplex}
    w^T A b + s sqrt(w^T A w)`` gives the weights ``b + (s / ||g_w||) w``
    with ``||g_w|| = sqrt(w^T A w)``, or all zeros when ``||g_w|| < norm_eps``
    (a convex combination of the normalised rows nearly vanishes: torchjd
    treats the point as Pareto-stationary; the tiny-J cases below the trace
    threshold land there too). The weights are applied to the un-normalised
    J and are not divided by ``1 + c^2``. The dual is solved to a gap of
    1e-12, so the weights agree with torchjd's to CLARABEL's accuracy
    (1e-8), not to rounding.

    Args:
      gramian: ``[K, K]`` Gramian.
      c: the radius scale of the ball constraint (>= 0; may be traced).
      norm_eps: trace threshold and Pareto-stationary threshold (static).

    Returns:
      ``[K]`` weights. A NaN Gramian gives NaN weights.
    """
    return _coefficients(gramian, c, convention="torchjd", rescale="none", norm_eps=norm_eps)


def cagrad(
    *,
    c: float,
    norm_eps: float = 1e-4,
    convention: str = "torchjd",
    rescale: str | None = None,
    max_iters: int = 200,
    tol: float = 1e-12,
) -> Aggregator:
    """torchjd's ``CAGrad(c, norm_eps)`` (``c`` required, as in torchjd), with LibMTL's form as an option.

    LibMTL's ``CAGrad`` is ``cagrad(c=..., convention="libmtl")`` (the optax
    transform :func:`softadapt_jax.gradients.cagrad` is that aggregator
    through :func:`~softadapt_jax.gradients.aggregators.optax_adapter.aggregate`).

    Args:
      c: the radius scale ``c >= 0`` of the ball around the mean gradient.
      norm_eps: torchjd's trace and Pareto-stationary threshold (static;
        unused by ``"libmtl"``).
      convention: ``"torchjd"`` (default) or ``"libmtl"`` (module docstring).
      rescale: ``"1+c^2"``, ``"1+c"`` (the authors' ``rescale=2``; a single
        component then gives its gradient), ``"none"``, or ``None`` for the
        convention's own (``"none"`` for torchjd, ``"1+c^2"`` for LibMTL).
      max_iters: cap on the Newton steps of the dual solver (static).
      tol: the duality gap to reach (floored at 64 machine epsilons).

    Returns:
      A stateless Gramian-weighting :class:`Aggregator` named ``"cagrad"``.
    """
    c = check_float(c, "c", low=0.0)
    norm_eps = check_float(norm_eps, "norm_eps", low=0.0)
    rescale = _rescale(convention, rescale)
    max_iters = check_positive_int(max_iters, "max_iters")
    tol = check_float(tol, "tol", low=0.0)
    options: dict[str, Any] = {
        "convention": convention,
        "rescale": rescale,
        "norm_eps": norm_eps,
        "max_iters": max_iters,
        "tol": tol,
    }
    return from_weighting("cagrad", lambda g: _coefficients(g, c, **options))


AGGREGATORS = {"cagrad": cagrad}
