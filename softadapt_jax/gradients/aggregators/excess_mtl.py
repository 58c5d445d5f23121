"""ExcessMTL (He et al. 2024): exponentiated-gradient task weights driven by excess-risk estimates."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_choice, check_positive_int
from softadapt_jax.gradients.aggregators._core import Aggregator, check_jacobian, combine_rows

CONVENTIONS = ("torchjd", "libmtl")
_H_EPS = 1e-7  # inside sqrt(S + 1e-7), and torchjd's guard of the baseline division


class ExcessMTLState(NamedTuple):
    """State of :func:`excess_mtl`."""

    weights: jax.Array  # [K] float: current weights (1/K at the start; ones for "libmtl")
    sq_grad_sum: jax.Array  # [K, n] float: running sum of the squared Jacobian entries
    initial_w: jax.Array  # [K] float: the baseline excess risks (zeros until set)
    warmup_w_sum: jax.Array  # [K] float: sum of the excess risks seen during warm-up
    n_steps: jax.Array  # int32 []: calls so far


def excess_mtl_step(
    jacobian: jax.Array,
    state: ExcessMTLState,
    *,
    robust_step_size: float = 1.0,
    n_warmup_steps: int = 0,
    convention: str = "torchjd",
) -> tuple[jax.Array, jax.Array, ExcessMTLState]:
    """One call of ExcessMTL: ``(direction [n], weights [K], new state)``.

    ``S += J**2``; the excess-risk proxy is ``w_k = sum_j J_kj^2 / sqrt(S_kj + 1e-7)``.

    * ``"torchjd"``: during the first ``n_warmup_steps`` calls the weights
      stay ``1/K`` and ``w`` is summed; the first call after that sets the
      baseline (the warm-up mean, or, without warm-up, the raw ``w`` of that
      call, which is then used undivided); later calls use
      ``w / (baseline + 1e-7)``. Weights: ``softmax(log weights +
      robust_step_size * w)``, on the simplex.
    * ``"libmtl"``: the weights start at ones and the first call only sets the
      baseline (weights stay ones); later calls multiply the weights by
      ``exp(robust_step_size * w / baseline)`` and renormalise them to sum K
      (computed in log space, which is the same to rounding but cannot
      overflow). A zero baseline (a task whose first gradient was zero) makes
      LibMTL divide by zero; we divide by ``1e-7`` instead, as torchjd does.

    The direction is ``weights @ J``. A non-finite Jacobian gives a NaN
    direction and leaves the state unchanged.
    """
    j = check_jacobian(jacobian)
    dtype = j.dtype
    finite = jnp.all(jnp.isfinite(j))
    sq = j * j
    s = state.sq_grad_sum.astype(dtype) + sq
    # A product with ones, not jnp.sum: the CPU backend runs a reduction with the square root
    # fused into it several times slower than the matrix kernel on the materialised ratio.
    w = jnp.matmul(
        sq / jnp.sqrt(s + _H_EPS), jnp.ones((j.shape[1],), dtype), precision=jax.lax.Precision.HIGHEST
    )
    weights0 = state.weights.astype(dtype)
    initial = state.initial_w.astype(dtype)
    k = j.shape[0]

    if convention == "libmtl":
        first = state.n_steps == 0
        ratio = w / jnp.where(initial > 0, initial, _H_EPS)
        logits = jnp.log(weights0) + robust_step_size * ratio
        updated = k * jax.nn.softmax(logits)
        weights = jnp.where(first, weights0, updated)
        new_initial = jnp.where(first, w, initial)
        warm_sum = state.warmup_w_sum.astype(dtype)
    else:
        warming = state.n_steps < n_warmup_steps
        warm_sum = state.warmup_w_sum.astype(dtype) + jnp.where(warming, w, 0.0)
        sets_baseline = state.n_steps == n_warmup_steps
        if n_warmup_steps > 0:
            baseline = jnp.where(sets_baseline, warm_sum / n_warmup_steps, initial)
            scaled = w / (baseline + _H_EPS)
        else:
            baseline = jnp.where(sets_baseline, w, initial)
            scaled = jnp.where(sets_baseline, w, w / (baseline + _H_EPS))
        updated = jax.nn.softmax(jnp.log(weights0) + robust_step_size * scaled)
        weights = jnp.where(warming, weights0, updated)
        new_initial = baseline

    keep = lambda new, old: jnp.where(finite, new, old.astype(dtype)).astype(old.dtype)  # noqa: E731
    new_state = ExcessMTLState(
        weights=keep(weights, state.weights),
        sq_grad_sum=keep(s, state.sq_grad_sum),
        initial_w=keep(new_initial, state.initial_w),
        warmup_w_sum=keep(warm_sum, state.warmup_w_sum),
        n_steps=state.n_steps + jnp.where(finite, 1, 0).astype(state.n_steps.dtype),
    )
    d = combine_rows(weights, j)
    return jnp.where(finite, d, jnp.nan), weights, new_state


def excess_mtl(
    *, robust_step_size: float = 1.0, n_warmup_steps: int = 0, convention: str = "torchjd"
) -> Aggregator:
    """ExcessMTL, Robust Multi-Task Learning with Excess Risks (He et al., ICML 2024).

    Task weights follow an exponentiated-gradient step on per-task excess
    risks, estimated by a second-order expansion with an AdaGrad-style
    diagonal Hessian (the paper's Eqs. 6, 7 and 9); see
    :func:`excess_mtl_step`. The update is ``weights @ J``.

    Reproduces torchjd 0.18.0 (``torchjd/aggregation/_excess_mtl.py``,
    ``ExcessMTL``) by default; ``convention="libmtl"`` reproduces LibMTL (git
    4336804, ``LibMTL/weighting/ExcessMTL.py``), whose weights start at ones
    and sum to K (LibMTL's trainer passes ``robust_step_size=0.01`` by default;
    give it explicitly).

    Args:
      robust_step_size: step size of the exponentiated update (> 0).
      n_warmup_steps: torchjd's warm-up calls with uniform weights (>= 0;
        must be 0 with ``"libmtl"``).
      convention: ``"torchjd"`` (default) or ``"libmtl"``.

    Returns:
      A stateful :class:`Aggregator`; ``init(K, n, dtype)`` gives
      :class:`ExcessMTLState` (it holds a ``[K, n]`` sum of squares).
    """
    if (
        isinstance(robust_step_size, bool)
        or not isinstance(robust_step_size, (int, float))
        or not robust_step_size > 0
    ):
        raise ValueError(f"`robust_step_size` must be a float > 0, got {robust_step_size!r}.")
    robust_step_size = float(robust_step_size)
    n_warmup_steps = check_positive_int(n_warmup_steps, "n_warmup_steps", minimum=0)
    convention = check_choice(convention, "convention", CONVENTIONS)
    if convention == "libmtl" and n_warmup_steps != 0:
        raise ValueError(
            "`n_warmup_steps` must be 0 with convention='libmtl' (LibMTL has no warm-up), "
            f"got {n_warmup_steps}."
        )

    def init(num_tasks: int, dim: int, dtype: Any = jnp.float32) -> ExcessMTLState:
        start = 1.0 if convention == "libmtl" else 1.0 / num_tasks
        return ExcessMTLState(
            weights=jnp.full((num_tasks,), start, dtype),
            sq_grad_sum=jnp.zeros((num_tasks, dim), dtype),
            initial_w=jnp.zeros((num_tasks,), dtype),
            warmup_w_sum=jnp.zeros((num_tasks,), dtype),
            n_steps=jnp.zeros((), jnp.int32),
        )

    def update(jacobian: Any, state: ExcessMTLState, *, losses: Any = None, key: Any = None):
        del losses, key
        j = check_jacobian(jacobian)
        if state.sq_grad_sum.shape != j.shape:
            raise ValueError(
                f"excess_mtl state was made for a jacobian of shape {tuple(state.sq_grad_sum.shape)}, "
                f"got {tuple(j.shape)}."
            )
        d, _, new_state = excess_mtl_step(
            j, state, robust_step_size=robust_step_size, n_warmup_steps=n_warmup_steps, convention=convention
        )
        return d, new_state

    return Aggregator(name="excess_mtl", init=init, update=update, stateful=True)


AGGREGATORS = {"excess_mtl": excess_mtl}
