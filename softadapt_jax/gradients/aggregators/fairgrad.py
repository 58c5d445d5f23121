"""FairGrad: alpha-fair weights, the root of ``G x = x^(-1/alpha)`` (torchjd's and LibMTL's ``FairGrad``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_float, check_positive_int
from softadapt_jax.gradients.aggregators._core import Aggregator, from_weighting
from softadapt_jax.gradients.aggregators._linalg import spd_solve

_CANCELLATION = 1e4  # stop when max_k x_k ||g_k|| exceeds this times ||x @ J|| (no root)
_POLISH = 3  # undamped Newton steps after the loop: the line search stalls at rounding level
_HALVINGS = 40  # candidate step lengths 1, 1/2, ..., 2^-39 of the damped Newton step


def _objective(x: jax.Array, g: jax.Array, alpha: float, zero: jax.Array) -> jax.Array:
    # f(x) = 1/2 x^T G x - sum_k h(x_k) with h'(x) = x^(-1/alpha): strictly convex on x > 0, and
    # its stationary point is the FairGrad system's root. Infeasible points get +inf.
    quad = 0.5 * jnp.einsum("...i,ij,...j->...", x, g, x)
    safe = jnp.where(x > 0, x, 1.0)
    if alpha == 1.0:
        h = jnp.log(safe)
    else:
        p = 1.0 - 1.0 / alpha
        h = safe**p / p
    h = jnp.where(zero, 0.0, h)
    return jnp.where(jnp.all(x > 0, axis=-1), quad - jnp.sum(h, axis=-1), jnp.inf)


def fairgrad_weights(gramian: jax.Array, *, alpha: float = 1.0, max_iters: int | None = None) -> jax.Array:
    """FairGrad's weights: the root ``x > 0`` of ``G x = x^(-1/alpha)`` (unnormalised).

    ``(G x)_k = <g_k, d>`` is task k's rate of improvement along the update
    ``d = x @ J``, so the root makes every ``x_k`` the alpha-fair price of
    task k (Eq. 4 of the paper). The root is the minimiser of the strictly
    convex ``f(x) = 1/2 x^T G x - sum_k h(x_k)``, ``h' = x^(-1/alpha)``,
    found here by damped Newton steps (Armijo backtracking, kept inside
    ``x > 0``) from the minimiser of ``f`` along the ones vector, to working
    precision. ``alpha = 0`` gives ``1/K``, as torchjd.

    Original implementations reproduced: torchjd 0.18.0,
    ``torchjd/aggregation/_fairgrad.py`` (``FairGradWeighting``) and LibMTL
    git 4336804, ``LibMTL/weighting/FairGrad.py`` (the same algorithm; the
    same weights). Both call ``scipy.optimize.least_squares`` on the
    residual ``G x - x^(-1/alpha)`` with bounds ``x >= 0`` from ``1/K`` and
    its default tolerances (``ftol = xtol = gtol = 1e-8``), so their root is
    accurate only to those tolerances; ours to rounding.

    No root: when a convex combination of the rows vanishes (the rows are
    Pareto-stationary: a zero row, ``g`` and ``-g``, rows summing to zero),
    ``f`` is unbounded below and some weights grow without bound along the
    minimising path; the references return wherever least_squares stopped
    (weights of about 1e2 to 1e4, not reproducible without replaying
    scipy's trust-region path). Here, instead:

    * a zero row (``G_kk = 0``; its equation ``0 = x_k^(-1/alpha)`` has no
      solution, and its weight does not touch the update) keeps the starting
      weight, and the others solve their own system;
    * otherwise the damped Newton path stops once the largest contribution
      ``x_k ||g_k||`` exceeds ``1e4 ||x @ J||`` (``_CANCELLATION``): the
      update is then a cancelling sum, whose rounding grows with that ratio,
      and it has converged to the bounded direction the path follows. This
      ratio stays near 1 at a root unless the rows nearly conflict.

    So the weights are finite, of the references' order, and the update is
    bounded; neither is the references' stopping point.

    Paper: Ban & Ji, "Fair Resource Allocation in Multi-Task Learning"
    (ICML 2024), Algorithm 1.

    Args:
      gramian: ``[K, K]`` Gramian.
      alpha: the fairness parameter (static, >= 0).
      max_iters: cap on the Newton steps (static); ``None``: 100.

    Returns:
      ``[K]`` positive weights. A non-finite Gramian gives non-finite weights.
    """
    alpha = check_float(alpha, "alpha", low=0.0)
    cap = 100 if max_iters is None else check_positive_int(max_iters, "max_iters")
    k = gramian.shape[0]
    dtype = gramian.dtype
    if alpha == 0.0:
        return jnp.full((k,), 1.0 / k, dtype)
    eps = jnp.finfo(dtype).eps
    diag = jnp.diagonal(gramian)
    zero = diag <= 0.0
    # Zero rows (and columns: |G_kj| <= sqrt(G_kk G_jj)) are taken out of the system.
    g = jnp.where(zero[:, None] | zero[None, :], 0.0, gramian)
    expo = -1.0 / alpha
    norms = jnp.sqrt(jnp.maximum(diag, 0.0))
    # Start: the minimiser of f on the ray x = t 1, t^(1 + 1/alpha) = K / (1^T G 1).
    total = jnp.sum(g)
    t0 = jnp.where(total > 0, (k / jnp.where(total > 0, total, 1.0)) ** (alpha / (alpha + 1.0)), 1.0 / k)
    x0 = jnp.full((k,), 1.0, dtype) * t0
    halvings = 0.5 ** jnp.arange(_HALVINGS, dtype=dtype)

    def newton(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        gx = g @ x
        power = x**expo
        grad = jnp.where(zero, 0.0, gx - power)
        curv = -expo * power / x  # d/dx of -x^(-1/alpha), positive
        hess = jnp.where(zero[:, None] | zero[None, :], 0.0, g + jnp.diag(curv)) + jnp.diag(
            zero.astype(dtype)
        )
        step = -spd_solve(hess, grad[:, None])[:, 0]  # hess is symmetric positive definite
        converged = jnp.max(jnp.abs(grad)) <= 64.0 * eps * (
            jnp.max(jnp.abs(gx)) + jnp.max(jnp.where(zero, 0.0, power))
        )
        cancelling = jnp.max(x * norms) > _CANCELLATION * jnp.sqrt(jnp.maximum(x @ gx, 0.0))
        return jnp.where(jnp.all(jnp.isfinite(step)), step, 0.0), grad, converged | cancelling

    def cond(carry: tuple) -> jax.Array:
        it, _, _, _, stop = carry
        return (it < cap) & ~stop

    def body(carry: tuple) -> tuple:
        it, x, step, grad, _ = carry
        shrink = jnp.where(step < 0, -x / jnp.where(step < 0, step, -1.0), jnp.inf)
        first = jnp.minimum(1.0, 0.99 * jnp.min(shrink))
        trial = x + (first * halvings)[:, None] * step
        values = _objective(trial, g, alpha, zero)
        current = _objective(x, g, alpha, zero)
        armijo = values <= current + 1e-4 * first * halvings * (grad @ step)
        moved = jnp.any(armijo)
        x = jnp.where(moved, trial[jnp.argmax(armijo)], x)
        step, grad, stop = newton(x)
        return it + 1, x, step, grad, stop | ~moved

    _, x, step, grad, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0), x0, *newton(x0)))

    def polish(_: int, carry: tuple) -> tuple:
        # Near the root f changes by less than its rounding, so Armijo stalls up to sqrt(eps)
        # away in x; plain Newton steps, kept when they stay feasible and shrink the residual,
        # finish the job.
        x, step, grad = carry
        new = x + step
        feasible = jnp.all(new > 0)
        new_step, new_grad, _ = newton(jnp.where(feasible, new, x))
        ok = feasible & (jnp.sum(new_grad**2) < jnp.sum(grad**2))
        return jnp.where(ok, new, x), jnp.where(ok, new_step, 0.0), jnp.where(ok, new_grad, grad)

    x = jax.lax.fori_loop(0, _POLISH, polish, (x, step, grad))[0]
    return x.astype(dtype)


def fairgrad(*, alpha: float, max_iters: int | None = None) -> Aggregator:
    """torchjd's ``FairGrad(alpha, max_iters)``: :func:`fairgrad_weights` (``alpha`` required, as in torchjd).

    ``max_iters`` caps our Newton steps (torchjd passes it to least_squares
    as ``max_nfev``). LibMTL's ``FairGrad`` computes the same weights, so it
    needs no option.

    Returns:
      A stateless Gramian-weighting :class:`Aggregator` named ``"fairgrad"``.
    """
    alpha = check_float(alpha, "alpha", low=0.0)
    if max_iters is not None:
        max_iters = check_positive_int(max_iters, "max_iters")
    return from_weighting("fairgrad", lambda g: fairgrad_weights(g, alpha=alpha, max_iters=max_iters))


AGGREGATORS = {"fairgrad": fairgrad}
