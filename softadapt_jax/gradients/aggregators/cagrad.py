"""CAGrad as torchjd's Gramian weighting (torchjd's ``CAGrad``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_float
from softadapt_jax.gradients.aggregators._core import Aggregator, from_weighting
from softadapt_jax.gradients.combiners import _cagrad_dual


def cagrad_weights(gramian: jax.Array, *, c: float, norm_eps: float = 1e-4) -> jax.Array:
    """CAGrad's weights in torchjd's form.

    With ``A = G / tr(G)`` (zeros when ``tr(G) < norm_eps``), ``b = 1/K`` and
    ``s = c sqrt(b^T A b)``, the dual ``w = argmin_{w in simplex}
    w^T A b + s sqrt(w^T A w)`` gives the weights ``b + (s / ||g_w||) w``
    with ``||g_w|| = sqrt(w^T A w)``, or all zeros when ``||g_w|| < norm_eps``
    (a convex combination of the normalised rows nearly vanishes: torchjd
    treats the point as Pareto-stationary; the tiny-J cases below the trace
    threshold land there too). The weights are applied to the un-normalised
    J and are not divided by ``1 + c^2``.

    Paper: Liu et al., "Conflict-Averse Gradient Descent for Multi-task
    Learning" (NeurIPS 2021), Algorithm 1. Original implementation
    reproduced: torchjd 0.18.0, ``torchjd/aggregation/_cagrad.py``
    (``CAGradWeighting``), which solves the dual with cvxpy/CLARABEL (gap
    tolerance 1e-8); here the interior-point solver of
    :mod:`softadapt_jax.gradients.combiners` solves it to a gap of 1e-12,
    so the weights agree to CLARABEL's accuracy, not to rounding.

    Args:
      gramian: ``[K, K]`` Gramian.
      c: the radius scale of the ball constraint (>= 0; may be traced).
      norm_eps: trace threshold and Pareto-stationary threshold (static).

    Returns:
      ``[K]`` weights. A NaN Gramian gives NaN weights.
    """
    k = gramian.shape[0]
    dtype = gramian.dtype
    c = jnp.asarray(c, dtype)
    b = jnp.full((k,), 1.0 / k, dtype)
    trace = jnp.trace(gramian)
    small = trace < norm_eps
    a = jnp.where(small, 0.0, gramian / jnp.where(small, 1.0, trace))
    sqrt_phi = c * jnp.sqrt(jnp.maximum(b @ a @ b, 0.0))
    w = b if k == 1 else _cagrad_dual(a, sqrt_phi, 0.0, 200, 1e-12)
    gw_norm = jnp.sqrt(jnp.maximum(w @ a @ w, 0.0))
    stationary = gw_norm < norm_eps
    return jnp.where(stationary, 0.0, b + sqrt_phi / jnp.where(stationary, 1.0, gw_norm) * w).astype(dtype)


def cagrad(*, c: float, norm_eps: float = 1e-4) -> Aggregator:
    """torchjd's ``CAGrad(c, norm_eps)`` (see :func:`cagrad_weights`); ``c`` is required, as in torchjd.

    For LibMTL's CAGrad (raw Gramian, 1e-8 guards, ``rescale``) use
    :func:`softadapt_jax.gradients.cagrad`.

    Returns:
      A stateless Gramian-weighting :class:`Aggregator` named ``"cagrad"``.
    """
    c = check_float(c, "c", low=0.0)
    norm_eps = check_float(norm_eps, "norm_eps", low=0.0)
    return from_weighting("cagrad", lambda g: cagrad_weights(g, c=c, norm_eps=norm_eps))


AGGREGATORS = {"cagrad": cagrad}
