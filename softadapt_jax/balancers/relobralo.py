"""ReLoBRaLo: Relative Loss Balancing with Random Lookback (Bischof & Kraus 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, _options, make_balancer, resolve_dtype, safe_ratio
from softadapt_jax.weights import stable_softmax


class _Convention(NamedTuple):
    """What distinguishes one implementation of ReLoBRaLo from another (see ``relobralo_balancer``)."""

    alpha: float  # default history weight
    tau: float  # default temperature
    expected_rho: float  # default probability of keeping the history
    eps: float  # default eps in the ratio denominators
    eps_in_normaliser: bool  # eps also added to the softmax's sum
    alpha_second_call: float | None  # the alpha of the second call (None: the configured alpha)
    first_call_keeps_lambdas: bool  # the first call only records the losses
    reference_call: int  # the call whose losses become the lookback reference


CONVENTIONS: dict[str, _Convention] = {
    "bischof": _Convention(
        alpha=0.999,
        tau=1.0,
        expected_rho=1.0,
        eps=1e-12,
        eps_in_normaliser=False,
        alpha_second_call=0.0,
        first_call_keeps_lambdas=False,
        reference_call=1,
    ),
    "physicsnemo": _Convention(
        alpha=0.95,
        tau=1.0,
        expected_rho=0.99,
        eps=1e-8,
        eps_in_normaliser=True,
        alpha_second_call=None,
        first_call_keeps_lambdas=True,
        reference_call=0,
    ),
}


def _convention(name: str) -> _Convention:
    return CONVENTIONS[_checks.check_choice(name, "convention", tuple(CONVENTIONS))]


def relobralo_init_state(num_weights: int, dtype: Any = None) -> dict[str, jax.Array]:
    """The recursion's state before the first call (without the PRNG key).

    ``{"lambdas": ones, "prev": ones, "ref": ones, "calls": 0}``, all ``[G]``
    except ``calls`` (int32 scalar). ``prev`` and ``ref`` start at the authors'
    placeholder 1.0, which only the ``"bischof"`` convention ever reads.
    """
    g = _checks.check_positive_int(num_weights, "num_weights")
    dt = resolve_dtype(dtype)
    # One buffer per entry, so that a step may donate the state.
    return {
        "lambdas": jnp.ones((g,), dt),
        "prev": jnp.ones((g,), dt),
        "ref": jnp.ones((g,), dt),
        "calls": jnp.zeros((), jnp.int32),
    }


def relobralo_step(
    state: dict[str, jax.Array],
    losses: jax.Array,
    rho: Any,
    *,
    convention: str = "bischof",
    alpha: Any = None,
    tau: Any = None,
    eps: Any = None,
) -> dict[str, jax.Array]:
    """One ReLoBRaLo update from this call's losses and a given lookback draw ``rho``.

    With ``bal(r) = G * softmax(L / (tau * r + eps))`` (max-shifted; with
    ``eps`` also added to the softmax's sum in the ``"physicsnemo"``
    convention), ``L`` = ``losses`` and ``n`` = ``state["calls"]``::

        lambdas <- rho_n * alpha_n * lambdas
                   + (1 - rho_n) * alpha_n * bal(ref)
                   + (1 - alpha_n) * bal(prev)
        prev    <- L
        ref     <- L              if n == reference call

    Conventions:

    * ``"bischof"`` (the authors' ``update_rules.relobralo`` as ``train.py``
      drives it): ``alpha_0 = 1``, ``alpha_1 = 0``, ``alpha_n = alpha``
      afterwards; ``rho_n = rho``; ``prev`` and ``ref`` are the placeholder 1.0
      until replaced, and ``ref`` becomes the losses of call 1 (the second).
      So call 0 gives ``lambdas = 1`` when ``rho = 1`` and ``G *
      softmax(L(0) / (tau + eps))`` when ``rho = 0``; call 1 gives ``bal(L(0))``.
    * ``"physicsnemo"`` (``Relobralo`` aggregator): call 0 only records
      ``prev = ref = L(0)`` and keeps ``lambdas``, ignoring ``rho``; from call 1
      on ``alpha_n = alpha`` and ``rho_n = rho``.

    This is the pure recursion behind :func:`relobralo_balancer`, which draws
    ``rho`` from its PRNG key; given recorded draws it replays a reference run.
    The hyperparameters may be arrays (e.g. ``vmap``-ped over configurations);
    ``None`` takes the convention's default. They are not validated here (the
    factory does that).

    Args:
      state: ``{"lambdas", "prev", "ref", "calls"}`` (:func:`relobralo_init_state`).
      losses: ``[G]`` this call's losses.
      rho: 0 (look back to ``ref``) or 1 (keep the history).
      convention: ``"bischof"`` or ``"physicsnemo"`` (static).
      alpha, tau, eps: as in :func:`relobralo_balancer`.

    Returns:
      The new state; its ``"lambdas"`` are the weights of this call.
    """
    conv = _convention(convention)
    alpha = conv.alpha if alpha is None else alpha
    tau = conv.tau if tau is None else tau
    eps = conv.eps if eps is None else eps
    lam, prev, ref, calls = state["lambdas"], state["prev"], state["ref"], state["calls"]
    dtype = lam.dtype
    losses = jnp.asarray(losses, dtype)
    g = losses.shape[0]
    alpha = jnp.asarray(alpha, dtype)
    alpha_second = alpha if conv.alpha_second_call is None else jnp.asarray(conv.alpha_second_call, dtype)
    alpha_n = jnp.where(calls == 0, 1.0, jnp.where(calls == 1, alpha_second, alpha)).astype(dtype)
    rho = jnp.asarray(rho, dtype)
    norm_eps = eps if conv.eps_in_normaliser else 0.0

    def bal(reference: jax.Array) -> jax.Array:
        return g * stable_softmax(safe_ratio(losses, tau * reference, eps), 1.0, eps=norm_eps)

    new_lam = rho * alpha_n * lam + (1 - rho) * alpha_n * bal(ref) + (1 - alpha_n) * bal(prev)
    if conv.first_call_keeps_lambdas:  # whatever rho was drawn
        new_lam = jnp.where(calls == 0, lam, new_lam)
    return {
        "lambdas": new_lam.astype(dtype),
        "prev": losses,
        "ref": jnp.where(calls == conv.reference_call, losses, ref),
        # Saturates: the recursion only distinguishes calls 0, 1 and later.
        "calls": jnp.minimum(calls + 1, 2).astype(jnp.int32),
    }


def relobralo_balancer(
    *,
    num_losses: int,
    convention: str = "bischof",
    alpha: float | None = None,
    tau: float | None = None,
    expected_rho: float | None = None,
    eps: float | None = None,
    seed: int = 0,
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    dtype: Any = None,
    groups: Sequence[int] | None = None,
) -> Balancer:
    """ReLoBRaLo weights: a randomly reset moving average of relative-loss softmaxes.

    With ``bal(r) = G * softmax(L(t) / (tau * r + eps))`` (G weights, one per
    group; ``G = K`` without ``groups``), at every recompute ``t``::

        rho     ~ Bernoulli(expected_rho)
        lambda  = rho * alpha_t * lambda + (1 - rho) * alpha_t * bal(L_ref)
                  + (1 - alpha_t) * bal(L(t-1))

    where ``L(t)`` is the newest history entry, ``L(t-1)`` the entry the
    previous recompute saw (the previous step when ``update_every=1``),
    ``L_ref`` the lookback reference, and ``lambda`` starts at ones. Every term,
    the PDE residual included, gets a weight; the weights sum to G. The
    schedule of ``alpha_t``, ``L_ref`` and the first call follow the
    ``convention`` (:func:`relobralo_step` gives the exact recursion):

    * ``"bischof"`` (default): the authors' code, github.com/rbischof/
      relative_balancing at commit b3c76d2, ``src/update_rules.py``
      ``relobralo`` as ``src/train.py`` drives it. Defaults are train.py's:
      ``alpha=0.999``, ``tau=1`` (its ``T``), ``expected_rho=1`` (its ``rho``:
      the lookback never fires), ``eps=1e-12`` in the ratio denominators, an
      exact softmax. Its schedule: the first call uses ``alpha_t = 1``, the
      second ``alpha_t = 0``, later ones ``alpha``; ``L_ref`` is the placeholder
      1.0 for the first two calls, then the losses of the second call (epoch 1,
      not epoch 0); ``L(t-1)`` is the placeholder 1.0 at the first call.
    * ``"physicsnemo"``: NVIDIA PhysicsNeMo-Sym 2.4.0 (formerly Modulus-Sym),
      ``physicsnemo/sym/loss/aggregator.py`` ``Relobralo``. Defaults
      ``alpha=0.95``, ``expected_rho=0.99`` (its ``beta``: the probability of
      KEEPING the history, not a moving-average factor), ``tau=1``,
      ``eps=1e-8``, added both to the ratio denominators and to the softmax's
      sum (``G * e / (sum(e) + eps)``). The first call keeps ``lambda = 1``
      and records ``L_ref = L(t-1) = L(0)``; then ``alpha_t = alpha``.

    The paper's hyperparameter table (arXiv:2110.09813) recommends
    ``alpha=0.999``, ``tau=0.1``, ``expected_rho=0.99`` (the defaults of this
    factory before it reproduced the authors' code); pass them explicitly.

    Timing: the references apply the weights computed from ``L(t)`` to the
    loss of the same step ``t``. Here, as for every balancer, the weights
    returned by ``update(L(t))`` are meant for step ``t+1`` (computed from past
    losses only), so in a train step they lag the references' by one step;
    the recursion itself, ``update(L(t))`` returning the references'
    ``lambda(t)``, is identical.

    ``method_state`` is ``{"key": uint32[2], "lambdas", "prev", "ref": [G],
    "calls": int32}``: a raw PRNG key (``jax.random.PRNGKey(seed)``, split at
    every recompute to draw ``rho``, under either convention) and the state
    of :func:`relobralo_step`.

    Reference: R. Bischof and M. Kraus, "Multi-Objective Loss Balancing for
    Physics-Informed Deep Learning", arXiv:2110.09813 (2021).

    Args:
      num_losses: K, the number of loss terms.
      convention: ``"bischof"`` (default) or ``"physicsnemo"``; sets the
        schedule, the eps placement and the defaults of the four options below.
      alpha: weight of the history term, in [0, 1].
      tau: temperature dividing the ratios, > 0.
      expected_rho: probability of keeping the history (``E[rho]``), in [0, 1].
      eps: added to ``tau * L`` in the ratios' denominators, >= 0.
      seed: seed of the PRNG key kept in the state (an int >= 0).
      update_every: recompute the weights every n steps, hold them between.
      accumulate: average the losses of n steps into one history entry (e.g.
        the authors' epochs).
      setpoint: optional ``[K]`` non-negative coefficients multiplying the weights.
      dtype: history dtype (float32 by default; float64 under x64).
      groups: optional length-K group ids; the terms of a group share one
        weight, computed from their summed loss.

    Returns:
      A :class:`~softadapt_jax.balancers.base.Balancer` with
      ``weights_sum = G``.

    Raises:
      ValueError: unknown ``convention``; ``alpha`` or ``expected_rho``
        outside [0, 1], ``tau`` not positive, ``eps`` negative, ``seed``
        negative; invalid ``num_losses``, ``groups``, ``update_every``,
        ``accumulate``, ``setpoint`` or ``dtype``.
    """
    options = _options(num_losses, update_every, accumulate, setpoint, dtype, groups)
    conv = _convention(convention)
    alpha = _checks.check_float(conv.alpha if alpha is None else alpha, "alpha", low=0.0, high=1.0)
    tau = _checks.check_float(conv.tau if tau is None else tau, "tau", low=0.0, low_open=True)
    expected_rho = _checks.check_float(
        conv.expected_rho if expected_rho is None else expected_rho, "expected_rho", low=0.0, high=1.0
    )
    eps = _checks.check_float(conv.eps if eps is None else eps, "eps", low=0.0)
    seed = _checks.check_seed(seed)

    def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
        del initial
        key, sub = jax.random.split(method_state["key"])
        rho = jax.random.bernoulli(sub, expected_rho)
        core = {name: value for name, value in method_state.items() if name != "key"}
        core = relobralo_step(core, history[-1], rho, convention=convention, alpha=alpha, tau=tau, eps=eps)
        return core["lambdas"], {"key": key, **core}

    g = options.num_groups
    init_method_state = {"key": jax.random.PRNGKey(seed), **relobralo_init_state(g, options.dtype)}
    return make_balancer(
        rule,
        **options._asdict(),
        window=1,
        weights_sum=float(g),
        name="relobralo",
        init_method_state=init_method_state,
    )
