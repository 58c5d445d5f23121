"""UPGrad: project every row onto the dual cone of the rows and combine (torchjd's ``UPGrad``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax._checks import check_choice, check_float
from softadapt_jax.gradients.aggregators._core import Aggregator, from_weighting
from softadapt_jax.gradients.aggregators._qp import normalize_and_regularize, project_dual_cone

SOLVERS = ("quadprog",)


def check_pref_vector(pref_vector: Any) -> tuple[float, ...] | None:
    """A static preference vector as a tuple of finite floats (``None`` stays ``None``)."""
    if pref_vector is None:
        return None
    if isinstance(pref_vector, jax.core.Tracer):
        raise TypeError(
            "`pref_vector` is static configuration: pass a list or a concrete array, not a traced value."
        )
    arr = np.asarray(pref_vector, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"`pref_vector` must be a vector (1-D) of K weights, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`pref_vector` must be finite, got {arr.tolist()}.")
    return tuple(float(v) for v in arr)


def pref_weights(pref_vector: tuple[float, ...] | None, k: int, dtype: Any) -> jax.Array:
    """The preference weights ``[K]``: ``pref_vector``, or Mean's ``1/K`` when it is ``None``."""
    if pref_vector is None:
        return jnp.full((k,), 1.0 / k, dtype)
    if len(pref_vector) != k:
        raise ValueError(
            f"`pref_vector` has {len(pref_vector)} entries but the Gramian is {k} x {k}: "
            "give one weight per row."
        )
    return jnp.asarray(pref_vector, dtype)


def check_projector_options(norm_eps: Any, reg_eps: Any, solver: Any) -> tuple[float, float]:
    """torchjd's ``QuadprogProjector`` options: ``norm_eps >= 0``, ``reg_eps >= 0``, solver ``"quadprog"``."""
    check_choice(solver, "solver", SOLVERS)
    return check_float(norm_eps, "norm_eps", low=0.0), check_float(reg_eps, "reg_eps", low=0.0)


def _projector_aggregator(
    name: str,
    weights: Callable[..., jax.Array],
    *,
    pref_vector: Any,
    norm_eps: Any,
    reg_eps: Any,
    solver: Any,
) -> Aggregator:
    """The Gramian-weighting aggregator of a torchjd projector method, its options checked once.

    ``weights(gramian, *, pref_vector, norm_eps, reg_eps)`` is the method's
    weighting (:func:`upgrad_weights`, :func:`~.dual_proj.dual_proj_weights`).
    """
    pref = check_pref_vector(pref_vector)
    norm_eps, reg_eps = check_projector_options(norm_eps, reg_eps, solver)
    return from_weighting(
        name, functools.partial(weights, pref_vector=pref, norm_eps=norm_eps, reg_eps=reg_eps)
    )


def upgrad_weights(
    gramian: jax.Array, *, pref_vector: Any = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> jax.Array:
    """UPGrad's weights: ``w = sum_i v_i``, ``v_i = argmin_{v >= p_i e_i} v^T G' v``.

    ``G' = G / tr(G) + reg_eps I`` (``G / tr(G)`` replaced by zeros when
    ``tr(G) < norm_eps``), and ``p`` is the preference vector (``1/K`` by
    default). ``v_i @ J`` is the projection of ``p_i g_i`` onto the dual cone
    of the rows (Proposition 1 of the paper), so the update ``w @ J`` is the
    weighted sum of the projected rows. Below the trace threshold ``G'`` is
    ``reg_eps I`` and the weights are exactly ``max(p, 0)``.

    Paper: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization"
    (arXiv:2406.16232). Original implementation reproduced: torchjd 0.18.0,
    ``torchjd/aggregation/_upgrad.py`` (``UPGradWeighting``) with
    ``torchjd/_linalg/_dual_cone.py`` (``QuadprogProjector``) and
    ``_linalg/_gramian.py`` (``normalize``, ``regularize``). torchjd solves
    the K QPs with quadprog; here ``_qp.project_dual_cone`` solves them
    exactly (same optimum, to rounding). LibMTL's ``UPGrad`` is a copy of
    torchjd's (same trace threshold and regulariser as its
    ``UPGrad_norm_eps``, ``UPGrad_reg_eps``), so it needs no option.

    Args:
      gramian: ``[K, K]`` Gramian ``J J^T``.
      pref_vector: ``None`` (``1/K``) or K static weights.
      norm_eps: trace threshold.
      reg_eps: added to the diagonal after normalisation; with ``0`` a
        singular Gramian makes the QP degenerate (torchjd's quadprog then
        raises; here the projection falls back to ``v_i = p_i e_i``).

    Returns:
      ``[K]`` weights. A non-finite Gramian gives non-finite weights.
    """
    k = gramian.shape[0]
    p = pref_weights(check_pref_vector(pref_vector), k, gramian.dtype)
    a = normalize_and_regularize(gramian, norm_eps, reg_eps)
    lower = jnp.diag(p)  # row i: the weights of p_i g_i
    return jnp.sum(jax.vmap(lambda u: project_dual_cone(a, u))(lower), axis=0)


def upgrad(
    *, pref_vector: Any = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4, solver: str = "quadprog"
) -> Aggregator:
    """torchjd's ``UPGrad(pref_vector, QuadprogProjector(norm_eps=, reg_eps=))`` (see :func:`upgrad_weights`).

    Args:
      pref_vector: ``None`` (Mean's ``1/K``) or K static weights.
      norm_eps: trace threshold of the normalisation (torchjd's 1e-4).
      reg_eps: diagonal regulariser (torchjd's 1e-4).
      solver: ``"quadprog"``, the only one: names the exact active-set
        answer torchjd's default projector gives (ours is
        ``_qp.project_dual_cone``).

    Returns:
      A stateless Gramian-weighting :class:`Aggregator` named ``"upgrad"``.
    """
    return _projector_aggregator(
        "upgrad", upgrad_weights, pref_vector=pref_vector, norm_eps=norm_eps, reg_eps=reg_eps, solver=solver
    )


AGGREGATORS = {"upgrad": upgrad}
