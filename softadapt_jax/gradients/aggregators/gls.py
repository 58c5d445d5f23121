"""GLS (Geometric Loss Strategy): descend the geometric mean of the task losses.

A loss-level method: the combined loss is ``(prod_k L_k)^(1/K)``, so the
update is ``sum_k c_k g_k`` with ``c_k = dLoss/dL_k = (prod_j L_j)^(1/K) / (K L_k)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax._checks import all_finite
from softadapt_jax.gradients.aggregators._core import Aggregator, check_jacobian, check_losses, no_state

NAME = "gls"


def gls_weights(losses: jax.Array) -> jax.Array:
    """The coefficients ``c_k = G / (K L_k)`` of GLS, ``G = (prod_j L_j)^(1/K)`` the geometric mean.

    These are the true gradient coefficients of the combined loss. LibMTL's
    ``GLS.backward`` *returns* ``L_k / (K prod_j L_j)`` instead, which does not
    describe its update; that value is not reproduced here.

    Args:
      losses: ``[K]`` positive task losses.

    Returns:
      ``[K]`` coefficients; non-finite (inf/NaN) where a loss is not positive
      (the aggregator then returns the zero update, see :func:`gls`).
    """
    k = losses.shape[0]
    # The geometric mean through the mean of the logs: the product itself over- or
    # underflows for many tasks or extreme losses.
    geo = jnp.exp(jnp.mean(jnp.log(losses)))
    return geo / (k * losses)


def gls() -> Aggregator:
    """GLS: the update ``sum_k c_k g_k`` of the geometric-mean loss (:func:`gls_weights`).

    Paper: Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning", CVPR workshops 2019.
    Original implementation reproduced: LibMTL, ``LibMTL/weighting/GLS.py``
    (git 4336804), whose combined loss ``losses.prod() ** (1/K)`` is
    differentiated by autograd; the coefficients here are the same derivative.

    Stateless; needs the current ``losses [K]`` (``update(J, (), losses=L)`` or
    ``agg(J, losses=L)``).

    Non-finite data: if a loss is not positive, or the Jacobian or losses hold
    inf/NaN, the geometric mean has no finite gradient (LibMTL gives NaN/inf);
    the update is then all zeros.
    """

    def update(jacobian: Any, state: Any, *, losses: Any = None, key: Any = None) -> tuple[jax.Array, Any]:
        del key
        j = check_jacobian(jacobian)
        losses_ = check_losses(losses, j.shape[0], NAME).astype(j.dtype)
        c = gls_weights(losses_)
        d = jnp.matmul(c, j, precision=jax.lax.Precision.HIGHEST)
        ok = all_finite(d) & jnp.all(losses_ > 0)
        return jnp.where(ok, d, jnp.zeros_like(d)), state

    return Aggregator(name=NAME, init=no_state, update=update, needs_losses=True)


AGGREGATORS = {NAME: gls}
