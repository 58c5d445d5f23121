"""DualProj: project the preference-weighted mean onto the dual cone of the rows (torchjd's ``DualProj``)."""

from __future__ import annotations

from typing import Any

import jax

from softadapt_jax.gradients.aggregators._core import Aggregator
from softadapt_jax.gradients.aggregators._qp import normalize_and_regularize, project_dual_cone
from softadapt_jax.gradients.aggregators.upgrad import _projector_aggregator, check_pref_vector, pref_weights


def dual_proj_weights(
    gramian: jax.Array, *, pref_vector: Any = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> jax.Array:
    """DualProj's weights: ``w = argmin_{v >= p} v^T G' v``.

    ``G'`` is UPGrad's trace-normalised, regularised Gramian
    (:func:`~.upgrad.upgrad_weights`), ``p`` the preference vector (``1/K``
    by default); ``w @ J`` is the projection of ``p @ J`` onto the dual cone
    of the rows. Below the trace threshold the weights are ``max(p, 0)``
    (Mean's, by default).

    Paper: Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
    Learning" (NeurIPS 2017), Eq. 11. Original implementation reproduced:
    torchjd 0.18.0, ``torchjd/aggregation/_dualproj.py`` (``DualProjWeighting``)
    with ``QuadprogProjector``; the QP is solved exactly by
    ``_qp.project_dual_cone``.

    Args:
      gramian: ``[K, K]`` Gramian.
      pref_vector: ``None`` (``1/K``) or K static weights.
      norm_eps: trace threshold.
      reg_eps: diagonal regulariser.

    Returns:
      ``[K]`` weights. A non-finite Gramian gives non-finite weights.
    """
    k = gramian.shape[0]
    p = pref_weights(check_pref_vector(pref_vector), k, gramian.dtype)
    return project_dual_cone(normalize_and_regularize(gramian, norm_eps, reg_eps), p)


def dual_proj(
    *, pref_vector: Any = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4, solver: str = "quadprog"
) -> Aggregator:
    """torchjd's ``DualProj(pref_vector, QuadprogProjector(norm_eps=, reg_eps=))``: :func:`dual_proj_weights`.

    Args:
      pref_vector: ``None`` (Mean's ``1/K``) or K static weights.
      norm_eps: trace threshold (torchjd's 1e-4).
      reg_eps: diagonal regulariser (torchjd's 1e-4).
      solver: ``"quadprog"`` (the exact active-set answer; see :func:`~.upgrad.upgrad`).

    Returns:
      A stateless Gramian-weighting :class:`Aggregator` named ``"dual_proj"``.
    """
    return _projector_aggregator(
        "dual_proj",
        dual_proj_weights,
        pref_vector=pref_vector,
        norm_eps=norm_eps,
        reg_eps=reg_eps,
        solver=solver,
    )


AGGREGATORS = {"dual_proj": dual_proj}
