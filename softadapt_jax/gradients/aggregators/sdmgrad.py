"""SDMGrad (stochastic direction-oriented multi-objective gradient), LibMTL's form.

Each step reads the gradients of THREE independent batches, ``J [3, K, n]``
(``zeta``, ``xi``, ``xi'``): the weights ``w`` take ``niter`` projected
heavy-ball steps on ``w^T G w / 2 + lamda w^T G 1/K`` with
``G = J_xi J_xi'^T`` normalised, and the update is
``(w^T J_zeta + lamda mean_k J_zeta) / (1 + lamda)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_float, check_positive_int
from softadapt_jax.gradients.aggregators._core import Aggregator
from softadapt_jax.gradients.aggregators.modo import _three_batch_aggregator

NAME = "sdmgrad"
# LibMTL's inner optimiser: torch.optim.SGD(lr=5, momentum=0.5), created anew at every call.
_INNER_LR, _INNER_MOMENTUM = 5.0, 0.5
_SCALE_EPS = 1e-8  # LibMTL's guard in G / (scale^2 + eps)


class SDMGradState(NamedTuple):
    """The state of :func:`sdmgrad`.

    Attributes:
      w: ``[K]`` the task weights on the simplex (start at 1/K).
    """

    w: jax.Array


def _euclidean_simplex_projection(v: jax.Array) -> jax.Array:
    # SDMGrad's own projection (numpy in LibMTL): a point already on the simplex is returned
    # as is, otherwise the sort-based threshold at the last index where u_i i > cumsum_i - 1.
    k = v.shape[0]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u)
    idx = jnp.arange(1, k + 1)
    rho = jnp.max(jnp.where(u * idx.astype(v.dtype) > css - 1.0, idx - 1, 0))
    theta = (css[rho] - 1.0) / (rho + 1).astype(v.dtype)
    on_simplex = (jnp.sum(v) == 1.0) & jnp.all(v >= 0)
    return jnp.where(on_simplex, v, jnp.maximum(v - theta, 0.0))


def sdmgrad_normalized_gramian(jacobians: jax.Array) -> jax.Array:
    """``G / (s^2 + 1e-8)`` with ``G = J_1 J_2^T`` and ``s = mean_k sqrt(max(G_kk, 0))``."""
    g = jnp.matmul(jacobians[1], jacobians[2].T, precision=jax.lax.Precision.HIGHEST)
    scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0)))
    return g / (scale**2 + _SCALE_EPS)


def sdmgrad_weights(gramian: jax.Array, w: jax.Array, *, lamda: float = 0.3, niter: int = 20) -> jax.Array:
    """``niter`` projected heavy-ball steps from ``w`` (LibMTL's inner loop).

    Each step: ``grad = G w + lamda mean_j G[:, j]``; momentum buffer
    ``m = grad`` on the first step, ``m = 0.5 m + grad`` after; ``w <- proj(w - 5 m)``.
    The momentum restarts at every call, as LibMTL builds a new optimiser each time.

    Args:
      gramian: ``[K, K]`` the normalised Gramian (:func:`sdmgrad_normalized_gramian`).
      w: ``[K]`` the starting weights.
      lamda: the regularisation (LibMTL's ``SDMGrad_lamda``).
      niter: the number of steps (LibMTL's ``SDMGrad_niter``).
    """
    gg_mean = jnp.mean(gramian, axis=1)

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        w, buf = carry
        grad = jnp.matmul(gramian, w, precision=jax.lax.Precision.HIGHEST) + lamda * gg_mean
        buf = jnp.where(i == 0, grad, _INNER_MOMENTUM * buf + grad)
        return _euclidean_simplex_projection(w - _INNER_LR * buf), buf

    w, _ = jax.lax.fori_loop(0, niter, body, (w, jnp.zeros_like(w)))
    return w


def sdmgrad(*, lamda: float = 0.3, niter: int = 20) -> Aggregator:
    """SDMGrad: ``w`` from :func:`sdmgrad_weights`, ``d = (w^T J_0 + lamda mean_k J_0) / (1 + lamda)``.

    Paper: Xiao et al., "Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms", NeurIPS 2023. Original implementation
    reproduced: LibMTL, ``LibMTL/weighting/SDMGrad.py`` (git 4336804),
    ``rep_grad=False``.

    Interface: ``update(J, state)`` with ``J [3, K, n]``: batch 0 is ``zeta``
    (combined into the update), batches 1 and 2 are ``xi``, ``xi'`` (their
    cross Gramian drives ``w``); ``losses`` ``[3, K]`` may be passed and is
    validated, but SDMGrad does not read it. The optax adapter, which stacks
    one Jacobian per step, does not serve this method.

    Args:
      lamda: the regularisation towards the mean direction (LibMTL's
        ``SDMGrad_lamda``, default 0.3; spelled as LibMTL spells it).
      niter: the inner steps per call (``SDMGrad_niter``, default 20).

    Returns:
      A stateful :class:`Aggregator` (state :class:`SDMGradState`).

    Non-finite data: a step whose Jacobian or result is not finite is skipped:
    zero update, state unchanged.
    """
    lamda = check_float(lamda, "lamda")
    if lamda == -1.0:
        raise ValueError("`lamda` must not be -1: the update is divided by 1 + lamda.")
    niter = check_positive_int(niter, "niter", minimum=0)

    def advance_weights(j: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        w = sdmgrad_weights(sdmgrad_normalized_gramian(j), w, lamda=lamda, niter=niter)
        hp = jax.lax.Precision.HIGHEST
        return (jnp.matmul(w, j[0], precision=hp) + lamda * jnp.mean(j[0], axis=0)) / (1.0 + lamda), w

    return _three_batch_aggregator(NAME, SDMGradState, advance_weights)


AGGREGATORS = {NAME: sdmgrad}
