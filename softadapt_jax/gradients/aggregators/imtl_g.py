"""IMTL-G: an update equally aligned with every row (torchjd's ``IMTLG``, LibMTL's ``IMTL``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_choice
from softadapt_jax.gradients.aggregators._core import Aggregator, from_weighting

CONVENTIONS = ("torchjd", "libmtl")
_SUM_EPS = 1e-12  # torchjd: |sum(v)| below this gives all-zero weights


def _torchjd_weights(gramian: jax.Array) -> jax.Array:
    k = gramian.shape[0]
    dtype = gramian.dtype
    d = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0))
    # torch.linalg.pinv's default cut-off: singular values below K eps sigma_max are dropped.
    v = jnp.linalg.pinv(gramian, rtol=k * jnp.finfo(dtype).eps) @ d
    total = jnp.sum(v)
    tiny = jnp.abs(total) < _SUM_EPS
    return jnp.where(tiny, 0.0, v / jnp.where(tiny, 1.0, total))


def _libmtl_weights(gramian: jax.Array) -> tuple[jax.Array, jax.Array]:
    # LibMTL's closed form written on the Gramian: with u_k = g_k / ||g_k||, D_i = g_0 - g_i and
    # U_j = u_0 - u_j (i, j >= 1), alpha_{1:} = (g_0 U^T)(D U^T)^{-1} and alpha_0 = 1 - sum.
    # Returns the weights and whether the closed form is defined (no zero row, D U^T regular).
    dtype = gramian.dtype
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0))
    ok = jnp.all(norms > 0)
    cross = gramian / jnp.where(norms > 0, norms, 1.0)[None, :]  # cross[a, b] = g_a . u_b
    g0u = cross[0, 0] - cross[0, 1:]  # g_0 . (u_0 - u_j)
    du = cross[0, 0] - cross[0, 1:][None, :] - cross[1:, 0][:, None] + cross[1:, 1:]
    # Singular to working precision: the entries of D U^T carry rounding of about eps max ||g_k||
    # (they are differences of Gramian entries over norms), so that floors the scale too.
    s = jnp.linalg.svd(du, compute_uv=False)
    scale = jnp.maximum(s[0], jnp.max(norms))
    ok = ok & (s[-1] > 16 * du.shape[0] * jnp.finfo(dtype).eps * scale)
    safe = jnp.where(ok, du, jnp.eye(du.shape[0], dtype=dtype))
    rest = jnp.linalg.solve(safe.T, g0u)
    return jnp.concatenate([1.0 - jnp.sum(rest, keepdims=True), rest]), ok


def imtl_g_weights(gramian: jax.Array, *, convention: str = "torchjd") -> jax.Array:
    """IMTL-G's weights: ``v = pinv(G) sqrt(diag G)``, ``w = v / sum(v)`` (zeros if ``|sum v| < 1e-12``).

    The update ``w @ J`` has the same projection on every unit row
    ``g_k / ||g_k||`` and its weights sum to 1. ``"torchjd"`` (default) is
    torchjd's generalisation through the pseudo-inverse (singular values
    below ``K eps sigma_max`` dropped, as torch's ``pinv``), which accepts
    zero and linearly dependent rows. ``"libmtl"`` is LibMTL's closed form
    (task 0 as the reference row): the same weights where it is defined (up
    to rounding); where LibMTL fails, a zero row (LibMTL: NaN) or a singular
    ``D U^T``, e.g. duplicate rows (LibMTL: ``LinAlgError``), it returns the
    ``"torchjd"`` weights instead.

    Paper: Liu et al., "Towards Impartial Multi-task Learning" (ICLR 2021);
    the generalisation: Quinton & Rey, arXiv:2406.16232. Original
    implementations reproduced: torchjd 0.18.0, ``torchjd/aggregation/_imtl_g.py``
    (``IMTLGWeighting``); LibMTL git 4336804, ``LibMTL/weighting/IMTL.py``
    (its gradient part; the learnable loss scales ``exp(s_k) L_k - s_k`` are
    a loss-level balancer, not this weighting, and a fresh model has
    ``exp(s_k) = 1``).

    Args:
      gramian: ``[K, K]`` Gramian.
      convention: ``"torchjd"`` (default) or ``"libmtl"``.

    Returns:
      ``[K]`` weights. A NaN Gramian gives NaN weights.
    """
    check_choice(convention, "convention", CONVENTIONS)
    reference = _torchjd_weights(gramian)
    if convention == "torchjd" or gramian.shape[0] == 1:
        return reference.astype(gramian.dtype)
    closed, ok = _libmtl_weights(gramian)
    return jnp.where(ok, closed, reference).astype(gramian.dtype)


def imtl_g(*, convention: str = "torchjd") -> Aggregator:
    """torchjd's ``IMTLG()``; ``convention="libmtl"``: LibMTL's ``IMTL`` weights (:func:`imtl_g_weights`).

    Returns:
      A stateless Gramian-weighting :class:`Aggregator` named ``"imtl_g"``.
    """
    check_choice(convention, "convention", CONVENTIONS)
    return from_weighting("imtl_g", lambda g: imtl_g_weights(g, convention=convention))


AGGREGATORS = {"imtl_g": imtl_g}
