"""Aligned-MTL: equal scales for the Gramian's eigen-directions (torchjd's ``AlignedMTL``, LibMTL's)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_choice
from softadapt_jax.gradients.aggregators._core import Aggregator, from_weighting
from softadapt_jax.gradients.aggregators.upgrad import check_pref_vector, pref_weights

SCALE_MODES = ("min", "median", "rmse")
CONVENTIONS = ("torchjd", "libmtl")


def balance_transformation(gramian: jax.Array, scale_mode: str = "min") -> jax.Array:
    """``B = sqrt(s) V_r diag(lambda_r^-1/2) V_r^T`` over the eigenpairs of G above ``max(lambda) K eps``.

    ``s`` is the smallest kept eigenvalue (``"min"``), their lower median
    (``"median"``, torch's median) or their mean (``"rmse"``). With no
    eigenvalue above the cut-off (the all-zero Gramian) ``B = I``.
    """
    check_choice(scale_mode, "scale_mode", SCALE_MODES)
    k = gramian.shape[0]
    dtype = gramian.dtype
    # As torch.linalg.eigh(UPLO="U"): ascending eigenvalues, read from the upper triangle.
    lam, vec = jnp.linalg.eigh(gramian, UPLO="U", symmetrize_input=False)
    keep = lam > jnp.max(lam) * k * jnp.finfo(dtype).eps
    rank = jnp.sum(keep)
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    if scale_mode == "min":
        scale = jnp.min(jnp.where(keep, lam, jnp.inf))
    elif scale_mode == "rmse":
        scale = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1)
    else:
        # torch.median of the kept eigenvalues (sorted descending, r of them) is the lower
        # median: the ((r - 1) // 2)-th smallest of them; the kept ones are the top r of lam.
        scale = lam[k - rank + (rank - 1) // 2]
    b = jnp.sqrt(jnp.where(rank > 0, scale, 1.0)) * (vec * inv_sqrt[None, :]) @ vec.T
    return jnp.where(rank > 0, b, jnp.eye(k, dtype=dtype))


def aligned_mtl_weights(
    gramian: jax.Array, *, pref_vector: Any = None, scale_mode: str = "min", convention: str = "torchjd"
) -> jax.Array:
    """Aligned-MTL's weights ``B p`` (:func:`balance_transformation`).

    ``p`` is the preference vector: ``pref_vector`` if given, else ``1/K``
    (``"torchjd"``) or ones (``"libmtl"``, LibMTL's ``Aligned_MTL``: K times
    torchjd's weights). The all-zero Gramian gives ``B = I``, so ``w = p``
    (torchjd; LibMTL raises ``IndexError`` there, we return ones).

    Paper: Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning" (CVPR 2023), Algorithm 1. Original implementations reproduced:
    torchjd 0.18.0, ``torchjd/aggregation/_aligned_mtl.py``
    (``AlignedMTLWeighting``); LibMTL git 4336804,
    ``LibMTL/weighting/Aligned_MTL.py`` (``scale_mode="min"`` only there).

    Args:
      gramian: ``[K, K]`` Gramian (its upper triangle is read, as torch's
        ``eigh(UPLO="U")``).
      pref_vector: ``None`` or K static weights.
      scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.
      convention: ``"torchjd"`` (default) or ``"libmtl"`` (default preference of ones).

    Returns:
      ``[K]`` weights. A NaN Gramian gives NaN weights.
    """
    check_choice(convention, "convention", CONVENTIONS)
    k = gramian.shape[0]
    pref = check_pref_vector(pref_vector)
    if pref is None and convention == "libmtl":
        p = jnp.ones((k,), gramian.dtype)
    else:
        p = pref_weights(pref, k, gramian.dtype)
    return balance_transformation(gramian, scale_mode) @ p


def aligned_mtl(
    *, pref_vector: Any = None, scale_mode: str = "min", convention: str = "torchjd"
) -> Aggregator:
    """torchjd's ``AlignedMTL(pref_vector, scale_mode)`` (see :func:`aligned_mtl_weights`).

    Returns:
      A stateless Gramian-weighting :class:`Aggregator` named ``"aligned_mtl"``.
    """
    pref = check_pref_vector(pref_vector)
    check_choice(scale_mode, "scale_mode", SCALE_MODES)
    check_choice(convention, "convention", CONVENTIONS)
    return from_weighting(
        "aligned_mtl",
        lambda g: aligned_mtl_weights(g, pref_vector=pref, scale_mode=scale_mode, convention=convention),
    )


AGGREGATORS = {"aligned_mtl": aligned_mtl}
