"""Random Loss Weighting (Lin et al. 2021)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, make_balancer
from softadapt_jax.weights import stable_softmax

RLW_DISTRIBUTIONS: tuple[str, ...] = ("normal", "uniform", "dirichlet")


def rlw_balancer(
    *,
    num_losses: int,
    distribution: str = "normal",
    seed: int = 0,
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    dtype: Any = None,
) -> Balancer:
    """Random weights, redrawn at every step, ignoring the losses.

    ``w = K * softmax(z)`` with, by ``distribution``:

    * ``"normal"`` (default, the paper's and LibMTL's choice): ``z ~ N(0, I)``;
    * ``"uniform"``: ``z ~ U(0, 1)^K``;
    * ``"dirichlet"``: no softmax, ``w = K * p`` with ``p ~ Dirichlet(1, ..., 1)``
      (uniform on the simplex), drawn as ``p = e / sum(e)``, ``e ~ Exp(1)^K``.

    The weights sum to K (LibMTL's RLW sums them to 1; the factor K keeps the
    scale of plain summation). ``method_state`` is ``{"key": uint32[2]}``, a raw
    PRNG key (``jax.random.PRNGKey(seed)``) split at every recompute: the draw
    uses the second half of ``jax.random.split(key)``, the first becomes the
    new key. Window 1: new weights after every step (every ``update_every``
    steps), used at the next step; the very first step uses ones (``init()``).

    Reference: B. Lin, F. Ye, Y. Zhang and I. W. Tsang, "Reasonable
    Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
    TMLR 2022 (arXiv:2111.10603).

    Args:
      num_losses: K, the number of loss components.
      distribution: ``"normal"``, ``"uniform"`` or ``"dirichlet"``.
      seed: seed of the PRNG key kept in the state (an int >= 0).
      update_every: redraw the weights every n steps, hold them between.
      accumulate: record the mean of n steps as one history entry (and redraw
        at most once per entry).
      setpoint: optional ``[K]`` non-negative coefficients multiplying the weights.
      dtype: history dtype, also that of the draws (float32 by default).

    Returns:
      A :class:`~softadapt_jax.balancers.base.Balancer` with
      ``weights_sum = K``.

    Raises:
      ValueError: unknown ``distribution``, negative ``seed``; invalid
        ``num_losses``, ``update_every``, ``accumulate``, ``setpoint`` or ``dtype``.
    """
    k = _checks.check_positive_int(num_losses, "num_losses")
    _checks.check_choice(distribution, "distribution", RLW_DISTRIBUTIONS)
    seed = _checks.check_positive_int(seed, "seed", minimum=0)

    def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
        del initial
        key, sub = jax.random.split(method_state["key"])
        dt = history.dtype
        if distribution == "normal":
            p = stable_softmax(jax.random.normal(sub, (k,), dt), 1.0, eps=0.0)
        elif distribution == "uniform":
            p = stable_softmax(jax.random.uniform(sub, (k,), dt), 1.0, eps=0.0)
        else:
            # Dirichlet(1, ..., 1) exactly: normalised Exp(1) draws (no gamma sampler).
            e = jax.random.exponential(sub, (k,), dt)
            total = jnp.sum(e)
            p = jnp.where(total > 0, e / jnp.where(total > 0, total, 1), 1 / k)
        return k * p, {"key": key}

    return make_balancer(
        rule,
        num_losses=k,
        window=1,
        weights_sum=float(k),
        init_method_state={"key": jax.random.PRNGKey(seed)},
        update_every=update_every,
        accumulate=accumulate,
        setpoint=setpoint,
        dtype=dtype,
        name=f"rlw_{distribution}",
    )
