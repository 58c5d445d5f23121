"""Minimum-norm points of a convex hull, from its Gramian, and projections onto the simplex.

``argmin_{w in simplex} w^T G w`` for a ``[K, K]`` Gramian ``G``, by the solver of
each MGDA convention (:mod:`softadapt_jax.gradients.aggregators.mgda`):
LibMTL's (Sener & Koltun's ``MinNormSolver``, iteration for iteration),
torchjd's Frank-Wolfe, and an exact one (Frank-Wolfe with away steps, then a
solve on the active face). All are ``lax.while_loop``s with a static iteration
cap, so they jit and vmap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Constants of LibMTL's MinNormSolver (git 4336804, LibMTL/weighting/MGDA.py).
_LIBMTL_CLAMP = 0.999  # the two-point rule's weight when one vector dominates
_LIBMTL_MIN_STEP = 1e-7  # step lengths at or below this are ignored by libmtl_next_point


def min_norm_2(g11: jax.Array, g12: jax.Array, g22: jax.Array) -> jax.Array:
    """The exact two-point min-norm weight: ``argmin_{0<=t<=1} ||t u + (1 - t) v||^2``.

    With ``g11 = ||u||^2``, ``g12 = <u, v>``, ``g22 = ||v||^2``:
    ``t = clip((g22 - g12) / (g11 - 2 g12 + g22), 0, 1)``, and ``t = 1/2`` when
    ``u = v`` (every t is optimal; 1/2 keeps the rule symmetric).
    """
    den = g11 - 2.0 * g12 + g22
    t = jnp.where(den > 0, (g22 - g12) / jnp.where(den > 0, den, 1.0), 0.5)
    return jnp.clip(t, 0.0, 1.0)


def libmtl_pair(v11: jax.Array, v12: jax.Array, v22: jax.Array) -> tuple[jax.Array, jax.Array]:
    # LibMTL's _min_norm_element_from2: weight on the first vector and the cost; when one
    # vector dominates, the weight is clamped to 0.999 / 0.001 instead of 1 / 0.
    first = v12 >= v11
    second = ~first & (v12 >= v22)
    den = jnp.where(first | second, 1.0, v11 + v22 - 2.0 * v12)
    gamma = (v22 - v12) / den
    clamp = jnp.asarray(_LIBMTL_CLAMP, v11.dtype)
    weight = jnp.where(first, clamp, jnp.where(second, 1.0 - clamp, gamma))
    cost = jnp.where(first, v11, jnp.where(second, v22, v22 + gamma * (v12 - v22)))
    return weight, cost


def libmtl_simplex_projection(y: jax.Array) -> jax.Array:
    # LibMTL's _projection2simplex: the threshold is the first partial mean (of the sorted
    # values, minus 1) that exceeds the next value, else the mean of all of them.
    # The projection commutes with adding a constant to every entry. Far outside the simplex
    # (a step of LibMTL's on a Gramian of large entries leaves it by about those entries) the
    # largest entry is subtracted first: otherwise `partial sum - 1` rounds the 1 away and the
    # result leaves the simplex. Iterates near the simplex are projected as LibMTL does.
    y = jnp.where(jnp.max(y) > 2.0, y - jax.lax.stop_gradient(jnp.max(y)), y)
    m = y.shape[0]
    s = jnp.sort(y)[::-1]
    tmax = (jnp.cumsum(s)[:-1] - 1.0) / jnp.arange(1, m, dtype=y.dtype)
    hit = tmax > s[1:]
    theta = jnp.where(jnp.any(hit), tmax[jnp.argmax(hit)], (jnp.sum(y) - 1.0) / m)
    return jnp.maximum(y - theta, 0.0)


def libmtl_next_point(w: jax.Array, direction: jax.Array) -> jax.Array:
    # LibMTL's _next_point: move along the direction projected on sum(w) = const, as far as the
    # first face it reaches (ignoring steps <= 1e-7, at most 1), then project onto the simplex.
    k = w.shape[0]
    proj = direction - jnp.sum(direction) / k
    neg, pos = proj < 0, proj > 0
    safe = jnp.where(neg | pos, proj, 1.0)
    to_zero = jnp.where(neg, -w / safe, 0.0)
    to_one = jnp.where(pos, (1.0 - w) / safe, 0.0)
    ok_zero = neg & (to_zero > _LIBMTL_MIN_STEP)
    ok_one = pos & (to_one > _LIBMTL_MIN_STEP)
    inf = jnp.asarray(jnp.inf, w.dtype)
    t = jnp.where(jnp.any(ok_zero), jnp.min(jnp.where(ok_zero, to_zero, inf)), 1.0)
    t = jnp.where(jnp.any(ok_one), jnp.minimum(t, jnp.min(jnp.where(ok_one, to_one, inf))), t)
    return libmtl_simplex_projection(proj * t + w)


def libmtl_min_norm(g: jax.Array, max_iters: int, tol: float) -> jax.Array:
    k = g.shape[0]
    i, j = (jnp.asarray(a) for a in np.triu_indices(k, 1))
    weight, cost = libmtl_pair(g[i, i], g[i, j], g[j, j])
    b = jnp.argmin(cost)  # the first cheapest pair, as LibMTL's strict '<' scan keeps it
    eye = jnp.eye(k, dtype=g.dtype)
    w0 = weight[b] * eye[i[b]] + (1.0 - weight[b]) * eye[j[b]]
    if k == 2:
        return w0

    def cond(carry: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        it, _, done = carry
        return (it < max_iters) & ~done

    def body(carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        it, w, _ = carry
        new = libmtl_next_point(w, -(g @ w))
        # The quadratic forms are sums of elementwise products, as LibMTL computes them: the
        # two-point rule compares them, and a different rounding can pick another branch.
        t, _ = libmtl_pair(_quad(w, w, g), _quad(w, new, g), _quad(new, new, g))
        cand = t * w + (1.0 - t) * new
        done = jnp.sum(jnp.abs(cand - w)) < tol
        # On convergence LibMTL returns the iterate before the last step.
        return it + 1, jnp.where(done, w, cand), done

    return jax.lax.while_loop(cond, body, (jnp.asarray(0), w0, jnp.asarray(False)))[1]


def _quad(u: jax.Array, v: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.sum(u[:, None] * v[None, :] * g)


def torchjd_frank_wolfe(g: jax.Array, max_iters: int, tol: float) -> jax.Array:
    # torchjd's MGDAWeighting: Frank-Wolfe from 1/K towards the vertex of the smallest (G w)_t,
    # exact line search; it stops after a step shorter than tol (that step is kept).
    k = g.shape[0]
    eye = jnp.eye(k, dtype=g.dtype)

    def cond(carry: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        it, _, done = carry
        return (it < max_iters) & ~done

    def body(carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        it, w, _ = carry
        gw = g @ w
        t = jnp.argmin(gw)
        a, b, c = w @ g[:, t], w @ gw, g[t, t]
        den = jnp.where((c <= a) | (b <= a), 1.0, b + c - 2.0 * a)
        gamma = jnp.where(c <= a, 1.0, jnp.where(b <= a, 0.0, (b - a) / den))
        return it + 1, (1.0 - gamma) * w + gamma * eye[t], gamma < tol

    init = (jnp.asarray(0), jnp.full((k,), 1.0 / k, g.dtype), jnp.asarray(False))
    return jax.lax.while_loop(cond, body, init)[1]


def exact_frank_wolfe(g: jax.Array, max_iters: int, tol: float) -> jax.Array:
    k = g.shape[0]
    eye = jnp.eye(k, dtype=g.dtype)
    # Start from the best pair, as Sener & Koltun do: for two tasks it already is the answer.
    i, j = (jnp.asarray(a) for a in np.triu_indices(k, 1))
    t = min_norm_2(g[i, i], g[i, j], g[j, j])
    cost = t**2 * g[i, i] + 2 * t * (1 - t) * g[i, j] + (1 - t) ** 2 * g[j, j]
    b = jnp.argmin(cost)
    w0 = t[b] * eye[i[b]] + (1 - t[b]) * eye[j[b]]

    def gap(w: jax.Array) -> jax.Array:
        grad = g @ w
        return w @ grad - jnp.min(grad)

    def cond(carry: tuple[jax.Array, jax.Array]) -> jax.Array:
        it, w = carry
        return (it < max_iters) & (gap(w) > tol)

    def body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        it, w = carry
        grad = g @ w
        wg = w @ grad
        s = jnp.argmin(grad)  # Frank-Wolfe vertex
        v = jnp.argmax(jnp.where(w > 0, grad, -jnp.inf))  # away vertex, within the support
        use_fw = (wg - grad[s]) >= (grad[v] - wg)
        d = jnp.where(use_fw, eye[s] - w, w - eye[v])
        step_max = jnp.where(use_fw, 1.0, w[v] / jnp.maximum(1.0 - w[v], 1e-30))
        dgd = d @ g @ d
        step = jnp.where(dgd > 0, -(d @ grad) / jnp.where(dgd > 0, dgd, 1.0), step_max)
        w = jnp.maximum(w + jnp.clip(step, 0.0, step_max) * d, 0.0)
        return it + 1, w / jnp.sum(w)

    _, w = jax.lax.while_loop(cond, body, (jnp.asarray(0), w0))
    return w


def polish_on_face(g: jax.Array, w: jax.Array, rounds: int = 3) -> jax.Array:
    # On the optimal face S the KKT conditions are linear: G_S w_S = lambda 1, sum w_S = 1.
    # S is guessed from the near-optimal w: near-active gradients, or clearly positive weights;
    # a solution with negative entries shrinks S and is solved again. A fori_loop rather than an
    # unrolled Python loop: one linear solve to compile instead of `rounds`.
    grad = g @ w
    lam = w @ grad
    support = (grad <= lam + 1e-3 * jnp.maximum(jnp.abs(lam), 1e-6)) | (w > 1e-3)

    def body(_: int, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        support, best, best_f = carry
        both = support[:, None] & support[None, :]
        m = jnp.where(both, g, 0.0) + jnp.diag(jnp.where(support, 0.0, 1.0))
        x = jnp.where(support, jnp.linalg.solve(m, support.astype(g.dtype)), 0.0)
        total = jnp.sum(x)
        x = x / jnp.where(total != 0, total, 1.0)
        f = x @ g @ x
        ok = jnp.all(jnp.isfinite(x)) & jnp.all(x >= 0) & (total != 0) & (f <= best_f)
        return support & (x > 0), jnp.where(ok, x, best), jnp.where(ok, f, best_f)

    return jax.lax.fori_loop(0, rounds, body, (support, w, lam))[1]


def project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of ``v`` onto the probability simplex (sort-based, permutation-equivariant)."""
    k = v.shape[0]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    idx = jnp.arange(1, k + 1, dtype=v.dtype)
    rho = jnp.max(jnp.where(u - css / idx > 0, jnp.arange(1, k + 1), 0))
    theta = css[rho - 1] / rho
    return jnp.maximum(v - theta, 0.0)
