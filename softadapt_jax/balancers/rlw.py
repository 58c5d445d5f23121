"""Random Loss Weighting (Lin et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, _options, _term_weights, make_balancer, resolve_dtype
from softadapt_jax.weights import stable_softmax

RLW_DISTRIBUTIONS: tuple[str, ...] = ("normal", "uniform", "dirichlet")


def rlw_draw(key: jax.Array, num_weights: int, distribution: str = "normal", dtype: Any = None) -> jax.Array:
    """The random draw ``z [G]`` that :func:`rlw_weights` turns into weights.

    ``"normal"``: ``N(0, I)``; ``"uniform"``: ``U(0, 1)^G``; ``"dirichlet"``:
    ``Exp(1)^G`` (normalised by :func:`rlw_weights` into a Dirichlet(1, ..., 1)
    sample; no gamma sampler needed).
    """
    _checks.check_choice(distribution, "distribution", RLW_DISTRIBUTIONS)
    dt = resolve_dtype(dtype)
    if distribution == "normal":
        return jax.random.normal(key, (num_weights,), dt)
    if distribution == "uniform":
        return jax.random.uniform(key, (num_weights,), dt)
    return jax.random.exponential(key, (num_weights,), dt)


def rlw_weights(draw: Any, *, distribution: str = "normal", sum_to_k: bool = False) -> jax.Array:
    """RLW's weights from one draw: ``softmax(z)``, or ``z / sum(z)`` for ``"dirichlet"``.

    The pure rule of :func:`rlw_balancer`, taking the draw as an argument so
    that draws made elsewhere (e.g. recorded from another library) can be
    replayed. For ``"normal"`` (and ``"uniform"``) it is ``softmax(z)``,
    max-shifted, summing to 1: LibMTL's ``F.softmax(torch.randn(K))``
    (``LibMTL/weighting/RLW.py``, git 4336804). For ``"dirichlet"`` ``z`` are
    ``Exp(1)`` draws and the weights ``z / sum(z)`` (uniform when the sum is 0).

    Args:
      draw: ``[G]`` the random draw (see :func:`rlw_draw`).
      distribution: ``"normal"``, ``"uniform"`` or ``"dirichlet"``.
      sum_to_k: multiply by G, so that the weights sum to G (the scale of plain
        summation) instead of 1.

    Returns:
      ``[G]`` non-negative weights summing to 1 (G with ``sum_to_k``).

    Raises:
      ValueError: unknown ``distribution``, ``draw`` not a vector.
    """
    _checks.check_choice(distribution, "distribution", RLW_DISTRIBUTIONS)
    z = _checks.as_float_array(draw, "draw")
    if z.ndim != 1 or z.shape[0] < 1:
        raise ValueError(f"`draw` must be a non-empty vector [G], got shape {tuple(z.shape)}.")
    g = z.shape[0]
    if distribution == "dirichlet":
        total = jnp.sum(z)
        p = jnp.where(total > 0, z / jnp.where(total > 0, total, 1), 1 / g)
    else:
        p = stable_softmax(z, 1.0, eps=0.0)
    return g * p if sum_to_k else p


def rlw_balancer(
    *,
    num_losses: int,
    distribution: str = "normal",
    sum_to_k: bool = False,
    seed: int = 0,
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    dtype: Any = None,
    groups: Sequence[int] | None = None,
) -> Balancer:
    """Random weights, redrawn at every step, ignoring the losses.

    ``w = softmax(z)`` with ``z ~ N(0, I)`` by default, a fresh draw for every
    step including the first: the paper's and LibMTL's RLW
    (``LibMTL/weighting/RLW.py``, git 4336804), whose weights sum to 1. See
    :func:`rlw_weights` for the rule and the other distributions
    (``"uniform"``: softmax of ``U(0, 1)`` draws; ``"dirichlet"``: uniform on
    the simplex). ``sum_to_k=True`` multiplies the weights by G (K without
    ``groups``), keeping the scale of plain summation.

    ``method_state`` is ``{"key": uint32[2]}``, a raw PRNG key. Every draw
    splits it, ``key, sub = jax.random.split(key)``, and uses
    ``rlw_draw(sub, G, distribution)``: ``init()`` makes the first draw (the
    weights of step 0, as LibMTL draws at every step), and each recompute the
    next one (window 1: after every step, or every ``update_every`` steps),
    used at the next step. Only the PRNG differs from LibMTL's ``torch.randn``:
    replaying LibMTL's recorded draws through :func:`rlw_weights` gives its
    weights.

    Reference: B. Lin, F. Ye, Y. Zhang and I. W. Tsang, "Reasonable
    Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
    TMLR 2022 (arXiv:2111.10603).

    Args:
      num_losses: K, the number of loss components.
      distribution: ``"normal"``, ``"uniform"`` or ``"dirichlet"``.
      sum_to_k: weights summing to G instead of 1 (default False, as LibMTL).
      seed: seed of the PRNG key kept in the state (an int >= 0).
      update_every: redraw the weights every n steps, hold them between.
      accumulate: record the mean of n steps as one history entry (and redraw
        at most once per entry).
      setpoint: optional ``[K]`` non-negative coefficients multiplying the weights.
      dtype: history dtype, also that of the draws (float32 by default).
      groups: optional length-K group ids (see
        :func:`~softadapt_jax.balancers.base.make_balancer`): one draw per
        group, shared by its terms.

    Returns:
      A :class:`~softadapt_jax.balancers.base.Balancer` with
      ``weights_sum = 1`` (G with ``sum_to_k``).

    Raises:
      ValueError: unknown ``distribution``, negative ``seed``; invalid
        ``num_losses``, ``update_every``, ``accumulate``, ``setpoint``,
        ``dtype`` or ``groups``.
      TypeError: ``sum_to_k`` not a bool.
    """
    options = _options(num_losses, update_every, accumulate, setpoint, dtype, groups)
    g = options.num_groups
    _checks.check_choice(distribution, "distribution", RLW_DISTRIBUTIONS)
    if not isinstance(sum_to_k, bool):
        raise TypeError(f"`sum_to_k` must be a bool, got {sum_to_k!r}.")
    seed = _checks.check_seed(seed)

    def draw_weights(method_state: Any) -> tuple[jax.Array, Any]:
        key, sub = jax.random.split(method_state["key"])
        z = rlw_draw(sub, g, distribution, options.dtype)
        return rlw_weights(z, distribution=distribution, sum_to_k=sum_to_k), {"key": key}

    def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
        del history, initial
        return draw_weights(method_state)

    balancer = make_balancer(
        rule,
        **options._asdict(),
        window=1,
        weights_sum=float(g) if sum_to_k else 1.0,
        name=f"rlw_{distribution}",
        init_method_state={"key": jax.random.PRNGKey(seed)},
    )

    def init() -> Any:
        # Step 0 gets a draw of its own, like every later step (not uniform warm-up weights).
        state = balancer.init()
        w, method_state = draw_weights(state.method_state)
        return state._replace(weights=_term_weights(w, options), method_state=method_state)

    return balancer._replace(init=init)
