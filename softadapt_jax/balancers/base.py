"""The shape every loss-statistics balancer shares: a state pytree and ``(init, update)``.

A balancer turns the stream of per-step component losses ``[K]`` into weights
``[K]``. All of them keep the same :class:`BalancerState` (a history window of
recent losses, counters, the current weights) plus a method-specific
``method_state`` pytree, and differ only in a *weight rule*: a pure function
from that history to new weights. :func:`make_balancer` wraps a rule with the
scheduling every method needs:

* ``window``: how many history entries the rule sees (oldest first).
* ``accumulate``: average the losses of n steps into one history entry
  (e.g. all batches of an epoch).
* ``update_every``: recompute the weights every n steps, hold them between.
* warm-up: until the window is full the weights are uniform, on the same scale
  as the adaptive weights (``1/K`` each for rules whose weights sum to 1, 1 each
  for rules whose weights sum to K), so adaptation starts without a jump.
* non-finite losses never enter the state: the whole update is rejected and
  ``rejected`` counts it.
* ``setpoint``: fixed prior coefficients that multiply the adaptive weights,
  so a user's intended ratio between losses is kept.
* ``groups``: terms that share one weight (a PINN's boundary edges, say): the
  rule sees one summed loss per group, and each term gets its group's weight.

Gradient-statistics methods (learning-rate annealing, gradient-norm and NTK
weighting) also need a statistic of the per-component gradients, but only on
the steps that recompute the weights. Their balancer declares the statistic
(``statistic=...``, with its static options on the :class:`Balancer`), the
state announces in ``recompute_next`` whether the coming step will recompute,
and the train step computes the statistic only then
(:func:`softadapt_jax.statistics.compute_statistic` under a ``lax.cond`` on
``recompute_next``), so every other step keeps a single backward pass.

Step semantics of ``update(losses, state)``, in order: reject non-finite
losses; add the losses to the accumulator; every ``accumulate`` steps push the
mean as one history entry; count the step; if the window is full, the step
count is a multiple of ``update_every`` and an entry was just pushed, apply the
rule. The returned weights are meant for the *next* step: weights are always
computed from past losses only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax import _checks

PyTree = Any


class BalancerState(NamedTuple):
    """State of any loss-statistics balancer (G = number of weight groups, K = number of terms).

    Without ``groups`` every term is its own group and G = K. Leading batch
    axes (a ``vmap``-ped or ``pmap``-replicated state) are kept on every field.

    Attributes:
      history: ``[window, G]`` recent loss entries, oldest first (float32, or
        the dtype given to the balancer). Entries not yet filled are 0.
      initial: ``[G]`` the first history entry pushed (0 before that); the
        reference of rules that compare with the initial losses.
      filled: int32, number of valid history entries (<= window).
      count: int32, number of accepted steps.
      rejected: int32, number of steps rejected for non-finite losses.
      accum: ``[G]`` mean of the losses accumulated towards the next entry
        (a running mean, so finite losses never overflow it).
      accum_count: int32, number of steps in ``accum``.
      weights: ``[K]`` current weights, one per term (already multiplied by the
        set-point).
      method_state: method-specific pytree (PRNG key, moving averages, ...).
      recompute_next: bool, whether the next accepted step will apply the rule
        (so a caller computes gradient statistics only then).
    """

    history: jax.Array  # [window, G] float
    initial: jax.Array  # [G] float
    filled: jax.Array  # [] int32
    count: jax.Array  # [] int32
    rejected: jax.Array  # [] int32
    accum: jax.Array  # [G] float, running mean
    accum_count: jax.Array  # [] int32
    weights: jax.Array  # [K] float
    method_state: PyTree
    recompute_next: jax.Array  # [] bool


class Schedule(NamedTuple):
    """The static schedule of a balancer: when its rule runs (see :func:`make_balancer`)."""

    window: int
    update_every: int
    accumulate: int
    update_first: bool


def recompute_due(schedule: Schedule, count: Any, filled: Any, accum_count: Any) -> Any:
    """Whether the accepted step after a state with these counters applies the rule.

    The one definition of a balancer's schedule: :func:`make_balancer` sets
    ``recompute_next`` with it, and host code that lays steps out statically
    calls it on Python ints (then it returns a bool).
    """
    window, update_every, accumulate, update_first = schedule
    # update_first: the first step that pushes an entry (step accumulate - 1) is a recompute
    # step; a phase of 0 with accumulate > 1 could never coincide with a push.
    phase = (accumulate - 1) % update_every if update_first else update_every - 1
    push = accum_count + 1 >= accumulate
    return push & (filled + 1 >= window) & (count % update_every == phase)


class WeightRule(Protocol):
    """A method's weight computation: ``(history, initial, method_state) -> (weights, method_state)``.

    ``history`` is the full ``[window, K]`` window (the rule is only called once
    it is full), ``initial`` the ``[K]`` first entry. The rule must be pure and
    jittable, and return finite weights for finite input. Rules of balancers
    with a ``statistic`` take the statistic array as a fourth argument.
    """

    def __call__(
        self, history: jax.Array, initial: jax.Array, method_state: PyTree, /
    ) -> tuple[jax.Array, PyTree]: ...


class Balancer(NamedTuple):
    """A loss balancer: a pair of pure functions and its static size.

    Attributes:
      init: ``() -> BalancerState``.
      update: ``(losses [K], state, statistics=None) -> (weights [K], state)``.
      num_losses: K, the number of loss components.
      weights_sum: what the weights sum to before the set-point (1.0 or K).
      name: a short name for tables and logs.
      statistic: ``None`` for loss-statistics methods, else the name of the
        gradient statistic the rule needs (see :mod:`softadapt_jax.statistics`).
      groups: ``None`` (every term its own weight) or the static length-K
        tuple of group ids: terms of one group share one weight, computed from
        their summed loss (and, for gradient statistics, from the gradient of
        that sum).
      statistic_options: static keyword arguments of
        :func:`softadapt_jax.statistics.compute_statistic` for ``statistic``,
        as ``(name, value)`` pairs.
      statistic_at: where a train step evaluates the statistic on a recompute
        step: ``"updated"`` (at the parameters after that step's update, on
        the same batch: the original PINN implementations) or ``"current"``
        (at the step's own parameters, sharing its backward passes).
      schedule: the static :class:`Schedule` (``None`` for balancers not built
        by :func:`make_balancer`).
    """

    init: Callable[[], BalancerState]
    update: Callable[..., tuple[jax.Array, BalancerState]]
    num_losses: int
    weights_sum: float
    name: str
    statistic: str | None = None
    groups: tuple[int, ...] | None = None
    statistic_options: tuple[tuple[str, Any], ...] = ()
    statistic_at: str = "current"
    schedule: Schedule | None = None


def check_groups(groups: Any, num_losses: int) -> tuple[int, ...] | None:
    """Validates ``groups``: ``None`` or a length-K sequence of int ids using each of 0..G-1.

    Returns:
      ``None`` or the ids as a tuple of Python ints (static configuration).

    Raises:
      TypeError: ``groups`` is an array or holds non-integers.
      ValueError: wrong length, or the ids are not exactly 0..G-1.
    """
    if groups is None:
        return None
    if isinstance(groups, jax.Array) or isinstance(groups, (str, bytes)):
        raise TypeError(
            f"`groups` is static configuration: a sequence of Python ints, got {type(groups).__name__}."
        )
    try:
        ids = tuple(groups)
    except TypeError:
        raise TypeError(f"`groups` must be a sequence of {num_losses} ints, got {groups!r}.") from None
    if any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) for g in ids):
        raise TypeError(f"`groups` must hold ints (group ids), got {list(ids)!r}.")
    ids = tuple(int(g) for g in ids)
    if len(ids) != num_losses:
        raise ValueError(
            f"`groups` must give one group id per loss term (length num_losses={num_losses}), "
            f"got length {len(ids)}: {list(ids)}."
        )
    used = sorted(set(ids))
    if used != list(range(len(used))):
        raise ValueError(
            f"`groups` must use each of the ids 0..G-1 (G = number of groups) at least once, got ids {used}."
        )
    return ids


def group_count(num_losses: int, groups: Any) -> int:
    """G, the number of weights a balancer's rule computes: K without groups, else the number of ids."""
    k = _checks.check_positive_int(num_losses, "num_losses")
    ids = check_groups(groups, k)
    return k if ids is None else max(ids) + 1


def group_sum(values: Any, groups: tuple[int, ...] | None) -> jax.Array:
    """Sums ``values [K, ...]`` over the terms of each group: ``[G, ...]`` (no change without groups)."""
    if groups is None:
        return values
    values = jnp.asarray(values)
    # segment_sum, not a 0/1 matrix product: an inf in one group must not make 0 * inf = nan in another.
    return jax.ops.segment_sum(values, np.asarray(groups), num_segments=max(groups) + 1)


def expand_groups(group_values: jax.Array, groups: tuple[int, ...] | None) -> jax.Array:
    """Gives each of the K terms its group's value: ``[G, ...] -> [K, ...]``."""
    if groups is None:
        return group_values
    return jnp.take(group_values, np.asarray(groups), axis=0)


def check_losses(losses: Any, num_losses: int, name: str = "losses") -> jax.Array:
    """Validates a ``[K]`` loss vector against the balancer's K (at trace time)."""
    arr = _checks.as_float_array(losses, name)
    if arr.shape != (num_losses,):
        raise ValueError(
            f"`{name}` must have shape [K]=({num_losses},) to match the balancer's "
            f"num_losses={num_losses}, got shape {tuple(arr.shape)}."
        )
    return arr


def check_setpoint(setpoint: Any, num_losses: int) -> jax.Array | None:
    """Validates optional set-point coefficients ``[K]`` (finite, >= 0 when concrete)."""
    if setpoint is None:
        return None
    arr = _checks.as_float_array(setpoint, "setpoint")
    if arr.shape != (num_losses,):
        raise ValueError(f"`setpoint` must have shape ({num_losses},), got {tuple(arr.shape)}.")
    if not isinstance(arr, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(arr) & (arr >= 0))):
        raise ValueError(f"`setpoint` must be finite and >= 0, got {arr}.")
    return arr


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """The history dtype :func:`make_balancer` will use (for method states built up front)."""
    hist_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    if not jnp.issubdtype(hist_dtype, jnp.floating) or jnp.finfo(hist_dtype).bits < 32:
        raise ValueError(f"`dtype` must be float32 or float64, got {hist_dtype}.")
    return hist_dtype


def safe_ratio(num: jax.Array, den: jax.Array, eps: float) -> jax.Array:
    """``num / (den + eps)``, defined everywhere.

    Where ``den + eps == 0`` (only possible with ``eps = 0`` or negative
    losses) the ratio is 1 if ``num == 0`` too (no change) and ``sign(num) * inf``
    otherwise; :func:`~softadapt_jax.weights.stable_softmax` clips infinities to
    the largest finite float, so the weights stay finite.
    """
    d = den + eps
    zero = d == 0
    inf_or_one = jnp.where(num == 0, jnp.ones_like(num), jnp.sign(num) * jnp.inf)
    return jnp.where(zero, inf_or_one, num / jnp.where(zero, jnp.ones_like(d), d))


# A history is replicated on every device and passed through every step; beyond this
# it is a mistake (a window in steps where entries were meant), not a configuration.
MAX_HISTORY_BYTES = 2**30


def _select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """``lax.select`` over matching pytrees (the branchless form of ``lax.cond``)."""
    return jax.tree.map(lambda a, b: jax.lax.select(pred, a, b), on_true, on_false)


STATISTIC_AT: tuple[str, ...] = ("updated", "current")


class _Options(NamedTuple):
    """The options every balancer factory takes, validated (the keywords of :func:`make_balancer`).

    A factory validates them first, since its rule and method state need G and
    the dtype, and passes them on with ``make_balancer(rule, **options._asdict(), ...)``.
    """

    num_losses: int  # K
    update_every: int
    accumulate: int
    setpoint: jax.Array | None  # [K] prior coefficients, or None
    dtype: Any  # the history dtype, float32 or float64
    groups: tuple[int, ...] | None  # static group ids; None: every term its own group

    @property
    def num_groups(self) -> int:
        """G, the number of weights the rule computes (K without groups)."""
        return group_count(self.num_losses, self.groups)


def _options(
    num_losses: Any,
    update_every: Any = 1,
    accumulate: Any = 1,
    setpoint: Any = None,
    dtype: Any = None,
    groups: Any = None,
) -> _Options:
    """Validates the options of :func:`make_balancer` that every balancer factory passes on."""
    k = _checks.check_positive_int(num_losses, "num_losses")
    update_every = _checks.check_positive_int(update_every, "update_every")
    accumulate = _checks.check_positive_int(accumulate, "accumulate")
    ids = check_groups(groups, k)
    return _Options(k, update_every, accumulate, check_setpoint(setpoint, k), resolve_dtype(dtype), ids)


def _term_weights(group_weights: jax.Array, options: _Options) -> jax.Array:
    """The ``[K]`` term weights of ``[G]`` group weights: each term's group weight times its set-point."""
    w = expand_groups(group_weights.astype(options.dtype), options.groups)
    if options.setpoint is None:
        return w
    # A traced set-point (a schedule under optax.inject_hyperparams) escapes the
    # construction-time check: clamp it to [0, max] so no weight is negative or nan.
    big = jnp.finfo(options.dtype).max
    return w * jnp.clip(jnp.nan_to_num(options.setpoint.astype(options.dtype), nan=0.0, posinf=big), 0.0, big)


def make_balancer(
    rule: WeightRule,
    *,
    num_losses: int,
    window: int,
    weights_sum: float,
    init_method_state: PyTree = (),
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    dtype: Any = None,
    name: str = "balancer",
    statistic: str | None = None,
    groups: Any = None,
    update_first: bool = False,
    statistic_options: tuple[tuple[str, Any], ...] = (),
    statistic_at: str = "current",
) -> Balancer:
    """Wraps a weight rule with the shared history, scheduling and robustness.

    Args:
      rule: the method's :class:`WeightRule`, on G components (the groups).
      num_losses: K >= 1, the number of loss terms the balancer receives.
      window: number of history entries the rule needs (>= 1).
      weights_sum: what the rule's G weights sum to (1.0 or G); the warm-up
        weights are uniform on that scale.
      init_method_state: the method's initial ``method_state`` pytree.
      update_every: recompute the weights every this many steps (>= 1).
      accumulate: average this many steps into one history entry (>= 1).
      setpoint: optional ``[K]`` non-negative coefficients multiplying the
        weights of the terms (warm-up weights included).
      dtype: history dtype; default float32 (float64 when x64 is enabled).
        Half-precision losses are stored in this dtype, never in half.
      name: label for logs and tables.
      statistic: the gradient statistic the rule needs as its fourth argument
        (``None``: a pure loss-statistics rule); ``[G, ...]``, one row per group.
      groups: ``None``, or a length-K sequence of group ids using each of
        0..G-1: the terms of a group share one weight, and the rule sees the
        group's summed loss (:func:`group_count`, :func:`group_sum`).
      update_first: recompute at steps 0, n, 2n, ... (0-based, ``n =
        update_every``; jaxpi and the learning-rate-annealing authors'
        schedule; with ``accumulate=a``, at steps a-1, a-1+n, ...) instead of
        n-1, 2n-1, ... (the rule runs once ``n`` steps of
        losses have been seen). Either way only once the window is full.
      statistic_options, statistic_at: how a train step computes
        ``statistic`` (see :class:`Balancer`); static.

    Returns:
      A :class:`Balancer` whose weights are ``[K]``.
    """
    options = _options(num_losses, update_every, accumulate, setpoint, dtype, groups)
    k, g, hist_dtype, group_ids = options.num_losses, options.num_groups, options.dtype, options.groups
    update_every, accumulate = options.update_every, options.accumulate
    window = _checks.check_positive_int(window, "window")
    if not isinstance(update_first, bool):
        raise TypeError(f"`update_first` must be a bool, got {update_first!r}.")
    _checks.check_choice(statistic_at, "statistic_at", STATISTIC_AT)
    history_bytes = window * g * jnp.dtype(hist_dtype).itemsize
    if history_bytes > MAX_HISTORY_BYTES:
        raise ValueError(
            f"`window`={window} would make a loss history of {history_bytes / 2**30:.3g} GiB "
            f"({window} x {g} {jnp.dtype(hist_dtype).name}); the limit is "
            f"{MAX_HISTORY_BYTES / 2**30:g} GiB. Use a shorter window, or `accumulate=` to average "
            "several steps into one entry."
        )
    schedule = Schedule(window, update_every, accumulate, update_first)

    def will_recompute(count: jax.Array, filled: jax.Array, accum_count: jax.Array) -> jax.Array:
        return recompute_due(schedule, count, filled, accum_count)

    def init() -> BalancerState:
        # A fresh buffer for every field, and a copy of the method's initial state (built once by
        # the factory): a step jitted with donate_argnums may then donate the state.
        def zeros() -> jax.Array:
            return jnp.zeros((g,), hist_dtype)

        def i32() -> jax.Array:
            return jnp.zeros((), jnp.int32)

        return BalancerState(
            history=jnp.zeros((window, g), hist_dtype),
            initial=zeros(),
            filled=i32(),
            count=i32(),
            rejected=i32(),
            accum=zeros(),
            accum_count=i32(),
            weights=_term_weights(jnp.full((g,), weights_sum / g, hist_dtype), options),
            method_state=jax.tree.map(lambda x: jnp.array(x, copy=True), init_method_state),
            recompute_next=will_recompute(i32(), i32(), i32()),
        )

    def accepted_update(losses: jax.Array, state: BalancerState, statistics: Any) -> BalancerState:
        recompute = will_recompute(state.count, state.filled, state.accum_count)
        accum_count = state.accum_count + 1
        # A running mean, not a sum: finite losses can never overflow it.
        n = accum_count.astype(hist_dtype)
        accum = state.accum - state.accum / n + losses / n
        push = accum_count >= accumulate
        entry = accum
        history = jnp.where(push, jnp.concatenate([state.history[1:], entry[None]]), state.history)
        initial = jnp.where(push & (state.filled == 0), entry, state.initial)
        filled = jnp.where(push, jnp.minimum(state.filled + 1, window), state.filled)
        count = state.count + 1

        def run_rule() -> tuple[jax.Array, PyTree]:
            if statistic is None:
                w, ms = rule(history, initial, state.method_state)
            else:
                w, ms = rule(history, initial, state.method_state, statistics)
            return _term_weights(w, options), ms

        # Rules are cheap (the expensive gradient statistics are computed by the
        # caller), so both branches are evaluated and selected: a select fuses
        # with its neighbours, where a conditional splits the compiled step.
        weights, method_state = _select(recompute, run_rule(), (state.weights, state.method_state))
        accum_count = jnp.where(push, 0, accum_count)
        return BalancerState(
            history=history,
            initial=initial,
            filled=filled,
            count=count,
            rejected=state.rejected,
            accum=jnp.where(push, jnp.zeros_like(accum), accum),
            accum_count=accum_count,
            weights=weights,
            method_state=method_state,
            recompute_next=will_recompute(count, filled, accum_count),
        )

    def update(losses: Any, state: BalancerState, statistics: Any = None) -> tuple[jax.Array, BalancerState]:
        losses = jax.lax.stop_gradient(check_losses(losses, k)).astype(hist_dtype)
        if statistic is not None and statistics is None:
            raise ValueError(
                f"The {name} balancer needs the gradient statistic {statistic!r} on the steps that "
                "recompute its weights: pass `statistics=` (see softadapt_jax.statistics)."
            )
        if statistics is not None:
            statistics = jax.lax.stop_gradient(jnp.asarray(statistics))
            if statistic is not None and (statistics.ndim == 0 or statistics.shape[0] != g):
                raise ValueError(
                    f"`statistics` for the {name} balancer must have one row per weight group "
                    f"({g} rows: the {statistic!r} statistic of each group's summed loss), got shape "
                    f"{tuple(statistics.shape)}."
                )
        if state.history.shape != (window, g) or state.weights.shape != (k,):
            raise ValueError(
                f"`state` has history {tuple(state.history.shape)} and weights "
                f"{tuple(state.weights.shape)}, but this balancer expects [window, G]=({window}, {g}) "
                f"and [K]=({k},); was the state made by another balancer?"
            )
        # A group's sum is non-finite whenever one of its terms is (or the sum overflows).
        grouped = group_sum(losses, group_ids)
        finite = jnp.all(jnp.isfinite(grouped))
        accepted = accepted_update(jnp.where(finite, grouped, 0), state, statistics)
        rejected = state._replace(rejected=state.rejected + 1)
        state = _select(finite, accepted, rejected)
        return state.weights, state

    return Balancer(
        init=init,
        update=update,
        num_losses=k,
        weights_sum=float(weights_sum),
        name=name,
        statistic=statistic,
        groups=group_ids,
        statistic_options=tuple(statistic_options),
        statistic_at=statistic_at,
        schedule=schedule,
    )
