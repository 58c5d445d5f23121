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

Gradient-statistics methods (learning-rate annealing, gradient-norm and NTK
weighting) also need a statistic of the per-component gradients, but only on
the steps that recompute the weights. Their balancer declares the statistic
(``statistic=...``), the state announces in ``recompute_next`` whether the
coming step will recompute, and the caller computes the statistic only then
(:func:`softadapt_jax.statistics.compute_statistic` under ``lax.cond``, or
in a step chosen on the host by :func:`softadapt_jax.training.jit_train_step`
from the balancer's static ``schedule``), so every other step keeps a single
backward pass.

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

from softadapt_jax import _checks

PyTree = Any


# Where each named field lives in the two stored arrays (see BalancerState).
_ROW_FIELDS: dict[str, int] = {"initial": -3, "accum": -2, "weights": -1}  # rows after the history
_COUNTER_FIELDS: dict[str, int] = {
    "filled": 0,
    "count": 1,
    "rejected": 2,
    "accum_count": 3,
    "recompute_next": 4,
}
NUM_SUMMARY_ROWS = len(_ROW_FIELDS)


class _StoredBalancerState(NamedTuple):
    rows: jax.Array
    counters: jax.Array
    method_state: PyTree


def _row_property(name: str) -> property:
    def get(self: _StoredBalancerState) -> jax.Array:
        return self.rows[..., _ROW_FIELDS[name], :]

    return property(get, doc=f"``[K]`` {name}, stored in ``rows``.")


def _counter_property(name: str) -> property:
    def get(self: _StoredBalancerState) -> jax.Array:
        return self.counters[..., _COUNTER_FIELDS[name]]

    return property(get, doc=f"int32 {name}, stored in ``counters``.")


class BalancerState(_StoredBalancerState):
    """State of any loss-statistics balancer.

    Every leaf of the optimizer state is an input and an output buffer of each
    jitted train step, at a few µs of host and device time per leaf on CPU, so
    the ten named fields below are stored in two arrays (plus the method's
    state): ``rows`` ``[window + 3, K]`` (the history, then ``initial``,
    ``accum`` and ``weights``) and ``counters`` int32 ``[5]`` (``filled``,
    ``count``, ``rejected``, ``accum_count``, ``recompute_next``). Read the
    fields as attributes; :meth:`pack` builds a state from them and
    ``_replace`` accepts them. Leading batch axes (a ``vmap``-ped or
    ``pmap``-replicated state) are kept by both.

    Attributes:
      history: ``[window, K]`` recent loss entries, oldest first (float32, or
        the dtype given to the balancer). Entries not yet filled are 0.
      initial: ``[K]`` the first history entry pushed (0 before that); the
        reference of rules that compare with the initial losses.
      filled: int32, number of valid history entries (<= window).
      count: int32, number of accepted steps.
      rejected: int32, number of steps rejected for non-finite losses.
      accum: ``[K]`` sum of the losses accumulated towards the next entry.
      accum_count: int32, number of steps in ``accum``.
      weights: ``[K]`` current weights (already multiplied by the set-point).
      method_state: method-specific pytree (PRNG key, moving averages, ...).
      recompute_next: bool, whether the next accepted step will apply the rule
        (so a caller computes gradient statistics only then).
    """

    __slots__ = ()

    @classmethod
    def pack(
        cls,
        *,
        history: jax.Array,
        initial: jax.Array,
        filled: jax.Array,
        count: jax.Array,
        rejected: jax.Array,
        accum: jax.Array,
        accum_count: jax.Array,
        weights: jax.Array,
        method_state: PyTree,
        recompute_next: jax.Array,
    ) -> BalancerState:
        """A state from its named fields (``history`` sets the float dtype)."""
        dtype = jnp.asarray(history).dtype
        summary = [jnp.asarray(v, dtype)[..., None, :] for v in (initial, accum, weights)]
        rows = jnp.concatenate([jnp.asarray(history), *summary], axis=-2)
        ints = (filled, count, rejected, accum_count, recompute_next)
        counters = jnp.stack([jnp.asarray(v).astype(jnp.int32) for v in ints], axis=-1)
        return cls(rows, counters, method_state)

    def _replace(self, **changes: Any) -> BalancerState:
        rows, counters = self.rows, self.counters
        if changes.keys() - {"method_state"}:  # states can hold NumPy arrays (e.g. after device_get)
            rows, counters = jnp.asarray(rows), jnp.asarray(counters)
        for name, value in changes.items():
            if name == "history":
                rows = rows.at[..., :-NUM_SUMMARY_ROWS, :].set(jnp.asarray(value, rows.dtype))
            elif name in _ROW_FIELDS:
                rows = rows.at[..., _ROW_FIELDS[name], :].set(jnp.asarray(value, rows.dtype))
            elif name in _COUNTER_FIELDS:
                counters = counters.at[..., _COUNTER_FIELDS[name]].set(jnp.asarray(value).astype(jnp.int32))
            elif name not in _StoredBalancerState._fields:
                raise ValueError(f"BalancerState has no field {name!r}.")
        stored = {"rows": rows, "counters": counters, "method_state": self.method_state}
        stored.update((k, v) for k, v in changes.items() if k in stored)
        return BalancerState(**stored)

    @property
    def history(self) -> jax.Array:
        """``[window, K]``, stored in ``rows``."""
        return self.rows[..., :-NUM_SUMMARY_ROWS, :]

    initial = _row_property("initial")
    accum = _row_property("accum")
    weights = _row_property("weights")
    filled = _counter_property("filled")
    count = _counter_property("count")
    rejected = _counter_property("rejected")
    accum_count = _counter_property("accum_count")

    @property
    def recompute_next(self) -> jax.Array:
        """bool, stored in ``counters`` as 0 or 1."""
        return self.counters[..., _COUNTER_FIELDS["recompute_next"]] != 0


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
    """

    init: Callable[[], BalancerState]
    update: Callable[..., tuple[jax.Array, BalancerState]]
    num_losses: int
    weights_sum: float
    name: str
    statistic: str | None = None


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


def _select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """``lax.select`` over matching pytrees (the branchless form of ``lax.cond``)."""
    return jax.tree.map(lambda a, b: jax.lax.select(pred, a, b), on_true, on_false)


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
) -> Balancer:
    """Wraps a weight rule with the shared history, scheduling and robustness.

    Args:
      rule: the method's :class:`WeightRule`.
      num_losses: K >= 1.
      window: number of history entries the rule needs (>= 1).
      weights_sum: what the rule's weights sum to (1.0 or K); the warm-up
        weights are uniform on that scale.
      init_method_state: the method's initial ``method_state`` pytree.
      update_every: recompute the weights every this many steps (>= 1).
      accumulate: average this many steps into one history entry (>= 1).
      setpoint: optional ``[K]`` non-negative coefficients multiplying the
        weights (warm-up weights included).
      dtype: history dtype; default float32 (float64 when x64 is enabled).
        Half-precision losses are stored in this dtype, never in half.
      name: label for logs and tables.
      statistic: the gradient statistic the rule needs as its fourth argument
        (``None``: a pure loss-statistics rule). A method state with a static
        ``schedule = (window, update_every, accumulate)`` attribute lets
        :func:`softadapt_jax.training.jit_train_step` predict the recompute
        steps on the host; without it that step uses the ``lax.cond`` step.

    Returns:
      A :class:`Balancer`.
    """
    k = _checks.check_positive_int(num_losses, "num_losses")
    window = _checks.check_positive_int(window, "window")
    update_every = _checks.check_positive_int(update_every, "update_every")
    accumulate = _checks.check_positive_int(accumulate, "accumulate")
    prior = check_setpoint(setpoint, k)
    hist_dtype = resolve_dtype(dtype)

    def apply_setpoint(w: jax.Array) -> jax.Array:
        return w if prior is None else w * prior.astype(w.dtype)

    def init() -> BalancerState:
        zeros, i32 = jnp.zeros((k,), hist_dtype), jnp.zeros((), jnp.int32)
        return BalancerState.pack(
            history=jnp.zeros((window, k), hist_dtype),
            initial=zeros,
            filled=i32,
            count=i32,
            rejected=i32,
            accum=zeros,
            accum_count=i32,
            weights=apply_setpoint(jnp.full((k,), weights_sum / k, hist_dtype)),
            method_state=init_method_state,
            recompute_next=will_recompute(jnp.int32(0), jnp.int32(0), jnp.int32(0)),
        )

    def will_recompute(count: jax.Array, filled: jax.Array, accum_count: jax.Array) -> jax.Array:
        push = accum_count + 1 >= accumulate
        return push & (jnp.minimum(filled + 1, window) >= window) & ((count + 1) % update_every == 0)

    def accepted_update(losses: jax.Array, state: BalancerState, statistics: Any) -> BalancerState:
        accum = state.accum + losses
        accum_count = state.accum_count + 1
        push = accum_count >= accumulate
        entry = accum / accum_count.astype(hist_dtype)
        history = jnp.where(push, jnp.concatenate([state.history[1:], entry[None]]), state.history)
        initial = jnp.where(push & (state.filled == 0), entry, state.initial)
        filled = jnp.where(push, jnp.minimum(state.filled + 1, window), state.filled)
        count = state.count + 1
        recompute = push & (filled >= window) & (count % update_every == 0)

        def run_rule(_: None) -> tuple[jax.Array, PyTree]:
            if statistic is None:
                w, ms = rule(history, initial, state.method_state)
            else:
                w, ms = rule(history, initial, state.method_state, statistics)
            return apply_setpoint(w.astype(hist_dtype)), ms

        def hold(_: None) -> tuple[jax.Array, PyTree]:
            return state.weights, state.method_state

        # Rules are cheap (the expensive gradient statistics are computed by the
        # caller), so both branches are evaluated and selected: a select fuses
        # with its neighbours, where a conditional splits the compiled step.
        weights, method_state = _select(recompute, run_rule(None), hold(None))
        accum_count = jnp.where(push, 0, accum_count)
        return BalancerState.pack(
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

    # Branches defined once, not per call: lax.cond caches its compilation on
    # the branch functions, so eager updates do not recompile every step.
    def accept(operand: tuple[jax.Array, BalancerState, Any]) -> BalancerState:
        losses, state, statistics = operand
        return accepted_update(losses, state, statistics)

    def reject(operand: tuple[jax.Array, BalancerState, Any]) -> BalancerState:
        state = operand[1]
        return state._replace(rejected=state.rejected + 1)

    def update(losses: Any, state: BalancerState, statistics: Any = None) -> tuple[jax.Array, BalancerState]:
        losses = jax.lax.stop_gradient(check_losses(losses, k)).astype(hist_dtype)
        if statistic is not None and statistics is None:
            raise ValueError(
                f"The {name} balancer needs the gradient statistic {statistic!r} on the steps that "
                "recompute its weights: pass `statistics=` (see softadapt_jax.statistics)."
            )
        if statistics is not None:
            statistics = jax.lax.stop_gradient(jnp.asarray(statistics))
        if state.history.shape != (window, k):
            raise ValueError(
                f"`state.history` has shape {tuple(state.history.shape)}, but this balancer "
                f"expects [window, K]=({window}, {k}); was the state made by another balancer?"
            )
        finite = jnp.all(jnp.isfinite(losses))
        operand = (jnp.where(finite, losses, 0), state, statistics)
        state = _select(finite, accept(operand), reject(operand))
        return state.weights, state

    return Balancer(
        init=init,
        update=update,
        num_losses=k,
        weights_sum=float(weights_sum),
        name=name,
        statistic=statistic,
    )
