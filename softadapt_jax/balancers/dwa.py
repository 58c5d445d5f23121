"""Dynamic Weight Average (Liu, Johns & Davison 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax import _checks
from softadapt_jax._checks import check_float
from softadapt_jax.balancers.base import Balancer, _options, make_balancer, safe_ratio
from softadapt_jax.weights import stable_softmax


def dwa_balancer(
    temperature: float = 2.0,
    *,
    num_losses: int,
    average_over: int = 1,
    eps: float = 0.0,
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    dtype: Any = None,
    groups: Sequence[int] | None = None,
) -> Balancer:
    """Dynamic Weight Average: a softmax of the losses' recent rates of descent.

    The weights applied at step t are::

        w_k(t) = K * exp(r_k / T) / sum_i exp(r_i / T),
        r_k    = L_k(t-1) / (L_k(t-2) + eps)

    (max-shifted softmax, summing to K; ``T = temperature``, default 2 as in
    the paper). In the balancer's terms, with ``n = average_over`` the history
    window is ``2n`` entries, oldest first, and::

        L(t-1) = mean(history[-n:])      # the n newest entries (history[-1] = newest)
        L(t-2) = mean(history[-2n:-n])   # the n entries before them

    With ``n = 1`` (default) that is ``history[-1] / history[-2]``: the newest
    recorded loss over the one before, and the weights computed after recording
    the loss of step t-1 are the ones used at step t, exactly the paper's
    indexing (no extra lag). Until the window is full the weights are 1 each,
    as the paper's ``w_k(1) = w_k(2) = 1``.

    The default reproduces LibMTL's DWA (``LibMTL/weighting/DWA.py``, git
    4336804), where "step" is an *epoch*: at epoch e >= 2 LibMTL weighs epoch
    e's losses by ``K softmax((B[e-1] / B[e-2]) / T)``, ``B`` being its Trainer's
    ``train_loss_buffer`` of epoch-average losses, and by ones in epochs 0 and
    1, with no epsilon. Here that is ``accumulate=steps_per_epoch``: each
    history entry is the mean of one epoch's steps, pushed at its last step,
    so the weights change once per epoch, at its end, and hold through the
    next epoch. (LibMTL averages the batches weighted by batch size; the mean
    here weights every step equally, the same for equal batches.)
    ``average_over=n`` instead compares sliding means of the last n entries
    with the n before and recomputes every step (every ``update_every``
    steps); the two combine (sliding means of accumulated entries).

    A zero loss needs no epsilon: with ``eps = 0`` a ratio ``x / 0`` is ``+inf``
    for ``x > 0`` (the softmax clips it, that loss takes all the weight) and
    ``0 / 0`` is 1 (see :func:`~softadapt_jax.balancers.base.safe_ratio`), so
    the weights stay finite; ``eps > 0`` shifts every ratio slightly.

    Reference: S. Liu, E. Johns and A. J. Davison, "End-to-End Multi-Task
    Learning with Attention", CVPR 2019 (arXiv:1803.10704), Eq. (7).

    Args:
      temperature: softmax temperature T > 0 (the paper and LibMTL use 2);
        larger is closer to uniform.
      num_losses: K, the number of loss components.
      average_over: number of newest entries averaged into ``L(t-1)`` (and of
        the entries before them into ``L(t-2)``), an int >= 1.
      eps: added to ``L(t-2)`` in the ratio's denominator, >= 0 (default 0,
        as the paper and LibMTL).
      update_every: recompute the weights every n steps, hold them between.
      accumulate: average the losses of n steps into one history entry (the
        paper's and LibMTL's per-epoch average).
      setpoint: optional ``[K]`` non-negative coefficients multiplying the weights.
      dtype: history dtype (float32 by default; float64 under x64).
      groups: optional length-K group ids (see
        :func:`~softadapt_jax.balancers.base.make_balancer`): the rule runs on
        the G group sums and its weights sum to G.

    Returns:
      A :class:`~softadapt_jax.balancers.base.Balancer` with
      ``weights_sum = G`` (K without ``groups``).

    Raises:
      ValueError: ``temperature`` not positive, ``eps`` negative,
        ``average_over`` < 1; invalid ``num_losses``, ``update_every``,
        ``accumulate``, ``setpoint``, ``dtype`` or ``groups``.
    """
    options = _options(num_losses, update_every, accumulate, setpoint, dtype, groups)
    g = options.num_groups
    temperature = check_float(temperature, "temperature", low=0.0, low_open=True)
    n = _checks.check_positive_int(average_over, "average_over")
    eps = check_float(eps, "eps", low=0.0)
    inv_t = 1.0 / temperature

    def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
        del initial
        recent = jnp.mean(history[n:], axis=0)
        older = jnp.mean(history[:n], axis=0)
        r = safe_ratio(recent, older, eps)
        return g * stable_softmax(r, inv_t, eps=0.0), method_state

    return make_balancer(rule, **options._asdict(), window=2 * n, weights_sum=float(g), name="dwa")
