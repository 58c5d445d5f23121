"""PCD, Priority-Constrained Descent: follow row 0 while every other row keeps a share of progress."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax.gradients.aggregators._core import Aggregator, check_jacobian, combine_rows, gramian_of

_HI = jax.lax.Precision.HIGHEST
_QP_TOL = 1e-9  # a constraint violated by at most this times max diag(G) counts as satisfied
_DEPENDENCE_TOL = 1e-9  # floor of the linear-dependence test of the active-set solver


class PCDState(NamedTuple):
    """State of :func:`pcd`."""

    sq_norm_ema: jax.Array  # [K] float: EMA of the squared row norms (zeros at the start)
    n_steps: jax.Array  # int32 []: calls that updated the EMA


def pcd_qp(gram: jax.Array, taus: jax.Array, *, dependence_tol: float = _DEPENDENCE_TOL) -> jax.Array:
    """Multipliers of PCD's QP, by the dual active-set method of Goldfarb and Idnani (1983).

    Solves ``min_d |d - g_1|^2 / 2  s.t.  g_j . d >= tau_j |g_j|^2 (j >= 2)``
    from the Gramian alone and returns ``w = [1, mu_2, ..., mu_K]`` with
    ``d = sum_i w_i g_i`` (``mu`` the KKT multipliers); ``[1, 0, ..., 0]`` when
    the constraints are infeasible. Each iteration adds the most violated
    constraint or drops the active one whose multiplier reaches zero first,
    as torchjd does (the linear solves use the active set as a mask), within a
    static cap of ``10 K`` add/drop steps.

    Args:
      gram: ``[K, K]`` Gramian (row/column 0: the primary objective).
      taus: ``[K - 1]`` progress fractions.
      dependence_tol: a row whose part orthogonal to the active rows has a
        squared norm below this fraction of its own counts as dependent.

    Returns:
      ``[K]`` weights.
    """
    k = gram.shape[0]
    dtype = gram.dtype
    first = jnp.zeros((k,), dtype).at[0].set(1.0)
    if k == 1:
        return first
    m = k - 1
    gs = gram[1:, 1:]
    b = taus * jnp.diagonal(gs) - gram[1:, 0]
    atol = _QP_TOL * jnp.maximum(jnp.max(jnp.diagonal(gram)), jnp.finfo(dtype).tiny)
    max_iters = 10 * k
    eye = jnp.eye(m, dtype=dtype)

    # carry: iterations, mu, active mask, p, slack_p, inner phase, done, infeasible, guard
    def cond(c):
        n_iters, _, _, _, _, _, done, _, guard = c
        return ~done & (n_iters < max_iters) & (guard < 2 * max_iters + 2)

    def body(c):
        n_iters, mu, active, p, slack_p, inner, _, infeasible, guard = c
        # Outer phase: pick the most violated constraint.
        slacks = jnp.where(active, 0.0, jnp.matmul(gs, mu, precision=_HI) - b)
        p_new = jnp.argmin(slacks)
        satisfied = slacks[p_new] >= -atol

        # Inner phase: step towards adding p.
        both = active[:, None] & active[None, :]
        mat = jnp.where(both, gs, eye)
        r = jnp.where(active, jnp.linalg.solve(mat, jnp.where(active, gs[:, p], 0.0)), 0.0)
        z_sq = gs[p, p] - jnp.dot(gs[p], r)
        ratios = jnp.where(active & (r > 0), mu / jnp.where(r > 0, r, 1.0), jnp.inf)
        kk = jnp.argmin(ratios)
        partial = ratios[kk]
        nonzero = z_sq > dependence_tol * gs[p, p]
        full = jnp.where(nonzero, -slack_p / jnp.where(nonzero, z_sq, 1.0), jnp.inf)
        step = jnp.minimum(partial, full)
        no_step = jnp.isinf(step)
        mu_step = (mu - jnp.where(active, step * r, 0.0)).at[p].add(step)
        adds = full <= partial
        mu_drop = mu_step.at[kk].set(0.0)
        active_drop = active.at[kk].set(False)
        mu_in = jnp.where(no_step, mu, jnp.where(adds, mu_step, mu_drop))
        active_in = jnp.where(no_step, active, jnp.where(adds, active.at[p].set(True), active_drop))
        slack_in = jnp.dot(gs[p], mu_in) - b[p]

        mu_out = jnp.where(inner, mu_in, mu)
        active_out = jnp.where(inner, active_in, active)
        p_out = jnp.where(inner, p, p_new)
        slack_out = jnp.where(inner, slack_in, slacks[p_new])
        inner_out = jnp.where(inner, ~no_step & ~adds, ~satisfied)
        done_out = jnp.where(inner, no_step, satisfied)
        infeasible_out = infeasible | (inner & no_step)
        n_out = n_iters + jnp.where(inner, 1, 0)
        return n_out, mu_out, active_out, p_out, slack_out, inner_out, done_out, infeasible_out, guard + 1

    init = (
        jnp.asarray(0),
        jnp.zeros((m,), dtype),
        jnp.zeros((m,), bool),
        jnp.asarray(0),
        jnp.asarray(0.0, dtype),
        jnp.asarray(False),
        jnp.asarray(False),
        jnp.asarray(False),
        jnp.asarray(0),
    )
    _, mu, _, _, _, _, _, infeasible, _ = jax.lax.while_loop(cond, body, init)
    w = first.at[1:].set(jnp.maximum(mu, 0.0))
    return jnp.where(infeasible, first, w)


def pcd_weights(gram: jax.Array, scales: jax.Array, taus: jax.Array) -> jax.Array:
    """PCD's weights for Gramian ``gram`` and row scales ``scales`` (the pure weighting).

    ``Gt = G * outer(s, s)``, ``w = pcd_qp(Gt)``; the weights are
    ``w * s * sqrt(G_00 / (w Gt w))`` (the direction rescaled to the norm of
    row 0), or zeros when ``G_00 = 0`` or the direction is zero up to the
    rounding of the Gramian (``w Gt w <= 10 eps (|w| . sqrt(diag Gt))^2``).
    """
    dtype = gram.dtype
    precision = 10.0 * float(jnp.finfo(dtype).eps)
    sq0 = gram[0, 0]
    gt = gram * jnp.outer(scales, scales)
    w = pcd_qp(gt, taus, dependence_tol=max(_DEPENDENCE_TOL, precision))
    dsq = jnp.dot(w, jnp.matmul(gt, w, precision=_HI))
    magnitude = jnp.dot(jnp.abs(w), jnp.sqrt(jnp.maximum(jnp.diagonal(gt), 0.0))) ** 2
    keep = (sq0 > 0) & (dsq > precision * magnitude)
    factor = jnp.sqrt(jnp.where(keep, sq0 / jnp.where(keep, dsq, 1.0), 0.0))
    return jnp.where(keep, w * scales * factor, 0.0)


def pcd_step(
    jacobian: jax.Array, state: PCDState, taus: jax.Array, *, beta: float = 0.999, eps: float = 1e-8
) -> tuple[jax.Array, jax.Array, PCDState]:
    """One call of PCD: ``(direction [n], weights [K], new state)``; see :func:`pcd`."""
    j = jacobian
    dtype = j.dtype
    gram = gramian_of(j)
    finite = jnp.all(jnp.isfinite(gram))
    gram_safe = jnp.where(finite, gram, 0.0)
    n_new = state.n_steps + 1
    ema = beta * state.sq_norm_ema.astype(dtype) + (1.0 - beta) * jnp.diagonal(gram_safe)
    debiased = ema / (1.0 - beta ** n_new.astype(dtype))
    denom = jnp.sqrt(debiased + eps)
    scales = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
    w = pcd_weights(gram_safe, scales, taus)
    d = combine_rows(w, j)
    new_state = PCDState(
        sq_norm_ema=jnp.where(finite, ema, state.sq_norm_ema.astype(dtype)).astype(state.sq_norm_ema.dtype),
        n_steps=jnp.where(finite, n_new, state.n_steps),
    )
    nan = jnp.asarray(jnp.nan, dtype)
    return jnp.where(finite, d, nan), jnp.where(finite, w, nan), new_state


def pcd(*, tau: Any = 0.02, beta: float = 0.999, eps: float = 1e-8) -> Aggregator:
    """Priority-Constrained Descent (Varam et al., TMLR 2026, arXiv:2606.29521).

    Row 0 of ``J`` is the primary objective (the method is NOT symmetric in
    the rows). With ``s_i = 1 / sqrt(v_i + eps)``, ``v`` the bias-corrected
    EMA (decay ``beta``) of the squared row norms over the calls, and
    ``g~_i = s_i g_i``::

        d~ = argmin_d |d - g~_1|^2 / 2   s.t.   g~_j . d >= tau_j |g~_j|^2  (j >= 2),

    and the update is ``d~`` rescaled to ``|g_1|``. Infeasible constraints
    (K >= 3, e.g. two opposite secondary rows) are dropped (update ``g_1``);
    ``g_1 = 0`` or ``d~ = 0`` give the zero update. A non-finite Jacobian
    gives a NaN update and leaves the EMA unchanged (as torchjd does).

    Reproduces torchjd 0.18.0 (``torchjd/aggregation/_pcd.py``, ``PCD`` and
    ``_solve_qp``); the weights are :func:`pcd_weights`.

    Args:
      tau: fraction in [0, 1], or a vector of K - 1 fractions (one per
        secondary row).
      beta: EMA decay in [0, 1).
      eps: >= 0, added to the EMA before the inverse square root.

    Returns:
      A stateful :class:`Aggregator`; ``init(K, n, dtype)`` gives :class:`PCDState`.
    """
    tau_arr = np.asarray(tau, dtype=np.float64)
    if tau_arr.ndim > 1 or not np.all((tau_arr >= 0.0) & (tau_arr <= 1.0)):
        raise ValueError(f"`tau` must be a float in [0, 1] or a vector of such floats, got {tau!r}.")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"`beta` must be a float in [0, 1), got {beta!r}.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"`eps` must be a float >= 0, got {eps!r}.")
    beta, eps = float(beta), float(eps)

    def taus_for(k: int, dtype) -> jax.Array:
        if tau_arr.ndim == 1:
            if tau_arr.shape[0] != k - 1:
                raise ValueError(
                    f"`tau` has {tau_arr.shape[0]} values but the jacobian has {k - 1} "
                    "secondary rows (K - 1)."
                )
            return jnp.asarray(tau_arr, dtype)
        return jnp.full((k - 1,), float(tau_arr), dtype)

    def init(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> PCDState:
        del dim
        return PCDState(sq_norm_ema=jnp.zeros((num_tasks,), dtype), n_steps=jnp.zeros((), jnp.int32))

    def update(jacobian: Any, state: PCDState, *, losses: Any = None, key: Any = None):
        del losses, key
        j = check_jacobian(jacobian)
        k = j.shape[0]
        if state.sq_norm_ema.shape != (k,):
            raise ValueError(
                f"pcd state holds {state.sq_norm_ema.shape[0]} norms but the jacobian has {k} rows."
            )
        d, _, new_state = pcd_step(j, state, taus_for(k, j.dtype), beta=beta, eps=eps)
        return d, new_state

    return Aggregator(name="pcd", init=init, update=update, stateful=True)


AGGREGATORS = {"pcd": pcd}
