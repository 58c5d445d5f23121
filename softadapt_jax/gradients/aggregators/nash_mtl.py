"""Nash-MTL (Navon et al. 2022): task weights from the Nash bargaining solution ``G alpha = 1/alpha``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_choice, check_positive_int
from softadapt_jax.gradients.aggregators._core import Aggregator, check_jacobian, combine_rows, gramian_of
from softadapt_jax.gradients.aggregators._nash_solver import bargaining_point, ccp_subproblem

_HI = jax.lax.Precision.HIGHEST
CONVENTIONS = ("torchjd", "libmtl")
# Constants of the released code (kept by torchjd and LibMTL).
_STOP_RESIDUAL = 1e-3  # stop when ||Gn alpha - 1/(alpha + 1e-10)|| < this
_STOP_MOVE = 1e-6  # or when a solve moves alpha by less than this
_ALPHA_GUARD = 1e-10
_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by ||g|| + 1e-6 (LibMTL)


class NashMTLState(NamedTuple):
    """State of :func:`nash_mtl`."""

    alpha: jax.Array  # [K] float: the last bargaining weights (unscaled); ones at the start
    step: jax.Array  # int32 []: number of calls so far


def nash_alpha(gramian: jax.Array, alpha: jax.Array, *, optim_niter: int = 20) -> jax.Array:
    """The weights of one Nash-MTL weight update: the released code's CCP, solved exactly.

    Starting from ``alpha`` (the previous weights), repeats at most
    ``optim_niter`` times: stop if ``||Gn alpha - 1/(alpha + 1e-10)|| < 1e-3``
    (``Gn = G / ||G||_F``); else solve the convex subproblem (see
    ``_nash_solver``) from ``alpha``; stop if its solution moved by less
    than ``1e-6`` (keeping ``alpha``), else move to it. Where the bargaining
    solution ``a_i (G a)_i = 1`` solves the subproblem (its KKT multipliers
    are positive) the loop ends after two solves. Otherwise the CCP, a
    descent method on ``1^T Gn a + (sum log a + sum log Gn a) / nf`` over
    ``{a_i (G a)_i >= 1}``, converges to a KKT point of that problem with
    some constraint inactive (a task weighted above its bargaining share), as
    the released code does wherever its solver is accurate; we follow it
    there, not the bargaining solution.

    Where the reference's ECOS solve fails we do not imitate the failure:

    * subproblem unbounded (or its data non-finite) while the bargaining
      solution exists: the bargaining solution is returned (the point the
      method is after; the reference keeps the previous ``alpha``);
    * no bargaining solution (``0`` is a non-negative combination of the rows:
      a zero row, ``g`` and ``-g``, rows summing to zero, the all-zero
      matrix): the previous ``alpha`` is kept (as the reference does).

    Args:
      gramian: ``[K, K]`` ``J J^T``.
      alpha: ``[K]`` the starting weights.
      optim_niter: static cap on the number of subproblem solves.

    Returns:
      ``[K]`` the new weights (not rescaled).
    """
    dtype = gramian.dtype
    nf = jnp.sqrt(jnp.sum(gramian * gramian))
    ok_scale = (nf > 0) & jnp.isfinite(nf)
    nf_safe = jnp.where(ok_scale, nf, 1.0)
    gn = jnp.where(ok_scale, gramian / nf_safe, jnp.eye(gramian.shape[0], dtype=dtype))
    root = jnp.sqrt(nf_safe)
    start = bargaining_point(gn)
    feasible = start.feasible & ok_scale
    a_star = start.b / root

    def subproblem(a0):
        gna0 = jnp.matmul(gn, a0, precision=_HI)
        c = jnp.sum(gn, axis=1) + (1.0 / a0 + jnp.matmul(gn, 1.0 / gna0, precision=_HI)) / nf_safe
        res = ccp_subproblem(gn, jnp.where(jnp.isfinite(c), c, 0.0), start)
        return res.b / root, res.solved & jnp.all(jnp.isfinite(c))

    def cond(carry):
        i, _, done = carry
        return (i < optim_niter) & ~done

    def body(carry):
        i, a_t, _ = carry
        residual = jnp.linalg.norm(jnp.matmul(gn, a_t, precision=_HI) - 1.0 / (a_t + _ALPHA_GUARD))
        stop_here = residual < _STOP_RESIDUAL
        new, solved = subproblem(a_t)
        moved = jnp.linalg.norm(new - a_t) >= _STOP_MOVE
        # Next point and whether to stop, in the order the released code tests them.
        fallback = jnp.where(feasible, a_star, a_t)
        a_next = jnp.where(stop_here, a_t, jnp.where(solved, jnp.where(moved, new, a_t), fallback))
        done = stop_here | ~solved | ~moved
        return i + 1, a_next, done

    alpha = alpha.astype(dtype)
    # Nothing to solve without a bargaining solution: keep alpha (the loop's
    # first test would stop on the failure anyway).
    _, a, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0), alpha, ~feasible))
    return a


def nash_mtl_step(
    jacobian: jax.Array,
    state: NashMTLState,
    *,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    optim_niter: int = 20,
    convention: str = "torchjd",
) -> tuple[jax.Array, jax.Array, NashMTLState]:
    """One call of Nash-MTL: ``(direction [n], weights [K], new state)``.

    The weights are ``alpha`` from :func:`nash_alpha` (recomputed when
    ``step % update_weights_every == 0``, else the previous ones), and the
    direction is ``alpha @ J`` limited to norm ``max_norm`` (``0``: no limit):

    * ``"torchjd"``: if ``||alpha @ J|| > max_norm`` the weights are scaled so
      that the norm is exactly ``max_norm``; ``weights`` are the scaled ones.
    * ``"libmtl"``: ``alpha`` is cast to float32 (LibMTL does so even in
      float64), the direction is multiplied by ``min(1, max_norm / (||d|| +
      1e-6))`` (``clip_grad_norm_``), and ``weights`` is the float32 ``alpha``
      before clipping (what LibMTL's ``backward`` returns).

    A non-finite Jacobian gives a NaN direction and leaves the state unchanged.
    """
    j = check_jacobian(jacobian)
    dtype = j.dtype
    finite = jnp.all(jnp.isfinite(j))
    j_safe = jnp.where(finite, j, 0.0)
    refresh = (state.step % update_weights_every) == 0

    alpha = jax.lax.cond(
        refresh & finite,
        lambda: nash_alpha(gramian_of(j_safe), state.alpha.astype(dtype), optim_niter=optim_niter),
        lambda: state.alpha.astype(dtype),
    )
    new_state = NashMTLState(
        alpha=jnp.where(finite, alpha, state.alpha.astype(dtype)).astype(state.alpha.dtype),
        step=state.step + jnp.where(finite, 1, 0).astype(state.step.dtype),
    )
    if convention == "libmtl":
        weights = alpha.astype(jnp.float32).astype(dtype)
        d = combine_rows(weights, j_safe)
        if max_norm > 0:
            norm = jnp.linalg.norm(d)
            d = d * jnp.minimum(1.0, max_norm / (norm + _CLIP_EPS))
    else:
        weights = alpha
        if max_norm > 0:
            norm = jnp.linalg.norm(combine_rows(weights, j_safe))
            weights = jnp.where(norm > max_norm, weights / jnp.where(norm > 0, norm, 1.0) * max_norm, weights)
        d = combine_rows(weights, j_safe)
    d = jnp.where(finite, d, jnp.nan)
    return d, weights, new_state


def nash_mtl(
    *,
    n_tasks: int | None = None,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    optim_niter: int = 20,
    convention: str = "torchjd",
) -> Aggregator:
    """Nash-MTL, Multi-Task Learning as a Bargaining Game (Navon et al., ICML 2022, arXiv:2202.01017).

    The weights solve the bargaining equation ``G alpha = 1 / alpha``
    (``G = J J^T``), approached as in the authors' released code by a
    sequence of convex problems started from the previous weights (see
    :func:`nash_alpha`); the update ``alpha @ J`` is limited to norm
    ``max_norm``. The state is the previous ``alpha`` (ones at the start) and
    the call counter.

    Reproduces torchjd 0.18.0 (``torchjd/aggregation/_nash_mtl.py``,
    ``NashMTL``) by default, with the inner cvxpy/ECOS solves replaced by an
    exact jittable barrier solver (``_nash_solver``); ``convention="libmtl"``
    reproduces LibMTL (git 4336804, ``LibMTL/weighting/Nash_MTL.py``): float32
    weights and ``clip_grad_norm_``'s ``1e-6``, see :func:`nash_mtl_step`.
    Where ECOS fails in the references (unbounded or infeasible subproblems,
    NaN data) the result differs on purpose, see :func:`nash_alpha`; the
    all-zero matrix (the references raise) gives the zero update and keeps
    the weights.

    Args:
      n_tasks: K, optional (torchjd requires it); if given, ``init`` and
        ``update`` check it against the Jacobian.
      max_norm: the largest norm of the update; ``0`` disables the limit.
      update_weights_every: recompute the weights every this many calls.
      optim_niter: the largest number of convex solves per weight update.
      convention: ``"torchjd"`` (default) or ``"libmtl"``.

    Returns:
      A stateful :class:`Aggregator`; ``init(K, n, dtype)`` gives
      :class:`NashMTLState`.
    """
    if n_tasks is not None:
        n_tasks = check_positive_int(n_tasks, "n_tasks")
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"`max_norm` must be a float >= 0, got {max_norm!r}.")
    max_norm = float(max_norm)
    update_weights_every = check_positive_int(update_weights_every, "update_weights_every")
    optim_niter = check_positive_int(optim_niter, "optim_niter")
    convention = check_choice(convention, "convention", CONVENTIONS)

    def check_k(k: int) -> None:
        if n_tasks is not None and k != n_tasks:
            raise ValueError(
                f"nash_mtl was configured with `n_tasks={n_tasks}` but got a jacobian with {k} rows."
            )

    def init(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> NashMTLState:
        del dim
        check_k(num_tasks)
        return NashMTLState(alpha=jnp.ones((num_tasks,), dtype), step=jnp.zeros((), jnp.int32))

    def update(jacobian: Any, state: NashMTLState, *, losses: Any = None, key: Any = None):
        del losses, key
        j = check_jacobian(jacobian)
        check_k(j.shape[0])
        if state.alpha.shape != (j.shape[0],):
            raise ValueError(
                f"nash_mtl state holds {state.alpha.shape[0]} weights but the jacobian has {j.shape[0]} rows."
            )
        d, _, new_state = nash_mtl_step(
            j,
            state,
            max_norm=max_norm,
            update_weights_every=update_weights_every,
            optim_niter=optim_niter,
            convention=convention,
        )
        return d, new_state

    return Aggregator(name="nash_mtl", init=init, update=update, stateful=True)


AGGREGATORS = {"nash_mtl": nash_mtl}
