"""ConFIG (Liu et al. 2024): the conflict-free direction of the unit-normalised gradients."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax.gradients.aggregators._common import static_floats
from softadapt_jax.gradients.aggregators._core import Aggregator, check_jacobian, gramian_of, no_state

_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default floor on the norm


def _check_pref_vector(pref_vector: Any) -> np.ndarray | None:
    arr = static_floats(pref_vector, "pref_vector", "None or a vector of K real numbers")
    if arr is None:
        return None
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(
            "`pref_vector` must be None or a non-empty finite vector (1-D), "
            f"got shape {arr.shape}: {pref_vector!r}."
        )
    return arr


def _mv(m: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.matmul(m, v, precision=jax.lax.Precision.HIGHEST)


def _min_norm_solution(units: jax.Array, evals: jax.Array, evecs: jax.Array, pref: jax.Array) -> jax.Array:
    """``pinv(U) p = U^T (U U^T)^{-1} p`` for ``U [K, n]`` of full row rank, from ``eigh(U U^T)``.

    One step of iterative refinement, with the residual ``p - U b`` formed from
    ``U`` itself, removes the error that the Gramian's squared condition
    number adds, so the result is as accurate as the SVD's while the caller
    keeps ``cond(U U^T) <= eps^(-1/2)``.
    """

    def solve(rhs: jax.Array) -> jax.Array:
        return _mv(evecs, _mv(evecs.T, rhs) / evals)

    coef = solve(pref)
    coef = coef + solve(pref - _mv(units, _mv(units.T, coef)))
    return _mv(units.T, coef)


def config_direction(jacobian: Any, pref_vector: Any = None) -> jax.Array:
    """ConFIG's update for ``J [K, n]``.

    With the unit rows ``u_k = g_k / ||g_k||`` (a zero row stays zero) and
    the preference vector ``p`` (ones by default)::

        b = pinv(U) p,    e = b / max(||b||, 1e-12),    d = (sum_k <g_k, e>) e

    ``b`` is the minimum-norm solution of ``<u_k, b> = p_k``, the direction
    that makes the same (preferred) angle with every gradient; the length is
    the sum of the gradients' projections on it.

    Reproduces torchjd 0.18.0 ``torchjd/aggregation/_config.py`` (``ConFIG``,
    adapted there from the authors' ``conflictfree`` package): the
    pseudo-inverse drops singular values below ``max(K, n) * eps`` times the
    largest (``torch.linalg.pinv``'s default), so duplicate, opposite or zero
    rows give the minimum-norm solution of the consistent part. The
    all-zero matrix gives the zero vector. A NaN entry gives a NaN update
    (there is no state to protect).

    The SVD of ``U [K, n]`` is needed only when its rows are (nearly)
    dependent. When ``K <= n`` and the ``K x K`` Gramian ``U U^T`` has
    ``lambda_min > sqrt(eps) lambda_max``, every singular value is far above
    the cut-off, so ``pinv(U) p = U^T (U U^T)^{-1} p`` exactly; that solve
    (one ``K^2 n`` product, a ``K x K`` eigendecomposition and one refinement
    step, ``_min_norm_solution``) replaces the SVD, chosen at run time by
    ``lax.cond`` (under ``vmap`` both branches run).

    Args:
      jacobian: ``[K, n]``.
      pref_vector: ``None`` (ones) or ``[K]`` preference weights.

    Returns:
      ``d [n]``.

    Raises:
      ValueError: ``pref_vector`` does not have K entries.
    """
    j = check_jacobian(jacobian)
    k, n = j.shape
    p = _check_pref_vector(pref_vector)
    if p is None:
        p = np.ones(k)
    if p.shape != (k,):
        raise ValueError(
            f"`pref_vector` must have K = {k} entries to match the jacobian's rows, got {p.shape[0]}."
        )
    norms = jnp.linalg.norm(j, axis=1, keepdims=True)
    units = jnp.where(norms > 0, j / jnp.where(norms > 0, norms, 1.0), 0.0)
    pref = jnp.asarray(p, j.dtype)

    def by_svd() -> jax.Array:
        rtol = max(k, n) * float(jnp.finfo(j.dtype).eps)
        return _mv(jnp.linalg.pinv(units, rtol=rtol), pref)

    if k > n:  # the rows are dependent: only the pseudo-inverse applies
        best = by_svd()
    else:
        gram = gramian_of(units)
        evals, evecs = jnp.linalg.eigh(gram)
        well_posed = evals[0] > evals[-1] * float(jnp.finfo(j.dtype).eps) ** 0.5
        best = jax.lax.cond(well_posed, lambda: _min_norm_solution(units, evals, evecs, pref), by_svd)
    unit = best / jnp.maximum(jnp.linalg.norm(best), _NORMALIZE_EPS)
    length = jnp.sum(_mv(j, unit))
    return length * unit


def config(*, pref_vector: Any = None) -> Aggregator:
    """ConFIG, conflict-free inverse gradients (Liu et al. 2024, arXiv:2408.11104, Eq. 2).

    Not a Gramian weighting: the direction comes from ``pinv`` of the unit
    rows (:func:`config_direction`). Reproduces torchjd 0.18.0 ``ConFIG``.

    Args:
      pref_vector: ``None`` (default: equal preference, ones) or a vector of
        K numbers (static; its length is checked against the Jacobian).

    Returns:
      A stateless :class:`Aggregator` named ``"config"``.
    """
    p = _check_pref_vector(pref_vector)

    def update(jacobian: Any, state: Any, *, losses: Any = None, key: Any = None) -> tuple[jax.Array, Any]:
        del losses, key
        return config_direction(jacobian, p), state

    return Aggregator(name="config", init=no_state, update=update)


AGGREGATORS = {"config": config}
