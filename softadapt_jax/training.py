"""Flax training helpers: a train state that passes ``losses`` to the optimizer, and step builders.

One step, whatever the device layout, reads top to bottom:

1. read the weights the balancer holds (computed from past losses only);
2. one forward and one backward pass: the gradient of ``sum_k w_k L_k`` as a
   VJP of the loss vector with ``w`` as cotangent;
3. on several devices, average losses and gradients across them, so every
   replica feeds the same numbers to its balancer;
4. ``tx.update(grads, opt_state, params, losses=losses)`` records the losses
   and updates the weights for the next step.

Layouts:

* one device: ``jax.jit(make_train_step(fn))``, or :func:`jit_train_step` in a
  Python loop (for the gradient-statistics balancers it compiles the steps
  with and without the statistic apart and picks one on the host, so the
  other steps run no conditional);
* ``jax.pmap``: :func:`make_pmap_train_step`, with :func:`replicate`,
  :func:`unreplicate` and :func:`shard_batch` (also across processes started
  with ``jax.distributed.initialize``; each process passes its local shard);
* ``jax.jit`` with ``NamedSharding`` (the current recommendation):
  :func:`make_sharded_train_step`, with :func:`data_mesh`.

Checkpoints use ``flax.serialization`` (msgpack bytes of the whole state,
balancer included): synchronous, dependency-free and exact, which is what a
small state like this needs; orbax is the choice for sharded multi-GB states
and works on the same pytree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from softadapt_jax import checkpoints
from softadapt_jax.balancers.base import group_sum
from softadapt_jax.gradients.per_component import per_component_grads
from softadapt_jax.guard import all_finite, count_skipped, keep_if, step_metrics
from softadapt_jax.statistics import (
    GRADIENT_STATISTICS,
    compute_statistic,
    statistic_from_grads,
    statistic_shape,
)
from softadapt_jax.transform import (
    check_losses_match_weights,
    find_balancer_states,
    get_weights,
    value_and_weighted_grad,
)

LossComponentsFn = Callable[[Any, Any], Any]
Metrics = dict[str, jax.Array]


class BalancedTrainState(train_state.TrainState):
    """A Flax ``TrainState`` whose ``apply_gradients`` passes ``losses`` to ``tx.update``.

    Flax's own ``apply_gradients(**kwargs)`` replaces dataclass fields with
    ``kwargs`` and never hands them to the optimizer, so a balancer inside
    ``tx`` would not see the losses.
    """

    def apply_gradients(
        self, *, grads: Any, losses: Any = None, statistics: Any = None, **kwargs: Any
    ) -> BalancedTrainState:
        """Applies ``grads`` and records ``losses`` (``[K]``) in the balancer.

        Args:
          grads: gradients with the structure of ``params``.
          losses: the current component losses, forwarded to ``tx.update``.
          statistics: the gradient statistic for balancers that need one.
          **kwargs: other dataclass fields to replace, as in Flax.

        Returns:
          The updated state (``step`` + 1).
        """
        updates, opt_state = self.tx.update(
            grads, self.opt_state, self.params, losses=losses, statistics=statistics
        )
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
            **kwargs,
        )

    @property
    def weights(self) -> jax.Array:
        """The balancer's current weights ``[K]``."""
        return get_weights(self.opt_state)


def _statistic_balancer(opt_state: Any) -> Any:
    """The one balancer state in ``opt_state`` whose balancer needs a gradient statistic, else ``None``.

    Host-side only (static attributes, no device work): ``None`` also when
    there is more than one balancer.
    """
    states = find_balancer_states(opt_state)
    if len(states) == 1 and getattr(states[0].method_state, "statistic", None) is not None:
        return states[0]
    return None


class _StatisticRequest(NamedTuple):
    """What the train step needs to know about the balancer that asks for a gradient statistic."""

    kind: str
    options: dict[str, Any]
    groups: tuple[int, ...] | None
    statistic_at: str
    due: jax.Array
    zeros: jax.Array


def _statistic_request(opt_state: Any) -> _StatisticRequest | None:
    """The request of the one balancer in ``opt_state`` that needs a statistic.

    ``None`` when no balancer (or more than one) asks for a gradient statistic.
    Method states without ``groups`` / ``statistic_at`` fields get one group per
    term and the statistic at the step's own parameters.
    """
    bstate = _statistic_balancer(opt_state)
    if bstate is None:
        return None
    ms = bstate.method_state
    kind = ms.statistic
    statistic_at = getattr(ms, "statistic_at", "current")
    if statistic_at not in ("updated", "current"):
        raise ValueError(f"`statistic_at` must be 'updated' or 'current', got {statistic_at!r}.")
    # One statistic row per weight group: the history holds one column per group.
    zeros = jnp.zeros(statistic_shape(kind, bstate.history.shape[-1]), bstate.weights.dtype)
    return _StatisticRequest(
        kind=kind,
        options=dict(getattr(ms, "statistic_options", ())),
        groups=getattr(ms, "groups", None),
        statistic_at=statistic_at,
        due=bstate.recompute_next,
        zeros=zeros,
    )


def make_train_step(
    loss_components_fn: LossComponentsFn,
    *,
    axis_name: str | None = None,
    has_aux: bool = False,
    residuals_fn: Callable[..., Any] | None = None,
    recompute: bool | None = None,
    guard: bool = True,
) -> Callable[[BalancedTrainState, Any], tuple[BalancedTrainState, Metrics]]:
    """Builds ``step(state, batch) -> (state, metrics)`` with one backward pass.

    Args:
      loss_components_fn: ``f(params, batch) -> losses [K]`` (or
        ``(losses, aux)`` with ``has_aux``); each loss a mean over the batch,
        so that averaging across devices gives the global-batch loss.
      axis_name: the ``pmap`` axis to average losses and gradients over
        (``None`` on one device or under sharded ``jit``).
      has_aux: whether ``f`` returns auxiliary outputs (put in ``metrics["aux"]``).
      residuals_fn: ``r(params, batch) -> K arrays`` of per-point residuals,
        needed only by the NTK balancer (see
        :func:`softadapt_jax.statistics.compute_statistic`: terms that work
        row by row, as PINN collocation sets do, cost one one-point backward
        pass per point).
      recompute: for balancers that need a gradient statistic: ``None``
        (default) decides on the device, from the balancer's
        ``recompute_next``, with a ``lax.cond``; ``True`` builds the step that
        always computes the statistic; ``False`` the step that never does (a
        balancer that is due then gets a statistic of zeros, which the
        built-in gradient-statistics rules take as no new estimate, so they
        keep their weights). :func:`jit_train_step`
        compiles the last two and picks one on the host. Ignored for other
        balancers.

    Balancers that need a gradient statistic (learning-rate annealing,
    gradient-norm, NTK weighting) get it computed only on the steps that
    recompute their weights: with ``recompute=None`` the step is a
    ``lax.cond`` between the plain step (one backward pass) and the step that
    also computes the statistic. For a step built once and used anywhere
    (``jit``, ``pmap``, inside ``lax.scan``).

    Where the statistic is evaluated is the balancer's choice (its method
    state's ``statistic_at``): ``"updated"`` (the original implementations)
    takes the step's weighted gradient and optimizer update as usual, then
    the statistic of the group-summed losses at the updated parameters on
    the same batch (G more backward passes); ``"current"`` takes it at the
    step's own parameters, where for the gradient statistics the K
    per-component backward passes also give the step's gradient (no
    separate weighted pass). Either way the weights recomputed on a step
    apply from the next step on.

    With ``guard=True`` (default) a step whose losses or gradients are not
    finite changes nothing: parameters, optimizer and balancer state stay as
    they were, the balancers in the optimizer state count it in ``rejected``,
    ``state.step`` does not advance, ``metrics["skipped"]`` is True, and
    training goes on (:mod:`softadapt_jax.guard`; one select per leaf, in the
    same compiled step). ``guard=False`` applies every step as it comes.

    Returns:
      A pure step function; ``metrics`` holds ``losses`` ``[K]``, ``weights``
      ``[K]`` (the ones used in this step), ``total`` (``sum_k w_k L_k``),
      ``loss`` (the plain sum) and ``skipped`` (bool).

    Raises:
      ValueError (at trace time): the loss function's output is not ``[K]``
        with K the balancer's number of losses.
      TypeError: ``recompute`` is not ``None`` or a bool, ``guard`` not a
        bool, or ``state`` is not a :class:`BalancedTrainState` (Flax's own
        ``TrainState`` would drop the losses).
    """
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(f"`recompute` must be None, True or False, got {recompute!r}.")
    if not isinstance(guard, bool):
        raise TypeError(f"`guard` must be a bool, got {guard!r}.")

    plain_fn = (lambda p, b: loss_components_fn(p, b)[0]) if has_aux else loss_components_fn

    def finish(
        state: BalancedTrainState,
        weights: jax.Array,
        values: tuple[Any, ...],
        grads: Any,
        statistics: jax.Array | None,
    ) -> tuple[BalancedTrainState, Metrics]:
        total, losses = values[0], values[1]
        new_state = state.apply_gradients(grads=grads, losses=losses, statistics=statistics)
        ok = all_finite(losses, grads) if guard else jnp.asarray(True)
        if guard:
            new_state = keep_if(ok, new_state, state.replace(opt_state=count_skipped(state.opt_state)))
        aux = values[2] if has_aux else None
        return new_state, step_metrics(losses, weights, total, ok, aux, has_aux=has_aux)

    def weighted_grads(state: BalancedTrainState, batch: Any) -> tuple[jax.Array, tuple[Any, ...], Any]:
        weights = get_weights(state.opt_state)
        grad_fn = value_and_weighted_grad(loss_components_fn, argnums=0, has_aux=has_aux)
        values, grads = grad_fn(weights, state.params, batch)
        if axis_name is not None:
            (total, losses), grads = jax.lax.pmean((values[:2], grads), axis_name)
            values = (total, losses, *values[2:])
        return weights, values, grads

    def balanced_step(
        state: BalancedTrainState, batch: Any, statistics: jax.Array | None
    ) -> tuple[BalancedTrainState, Metrics]:
        return finish(state, *weighted_grads(state, batch), statistics)

    def statistic_at(params: Any, batch: Any, request: _StatisticRequest) -> jax.Array:
        stats = compute_statistic(
            request.kind,
            plain_fn,
            params,
            batch,
            residuals_fn=residuals_fn,
            axis_name=axis_name,
            groups=request.groups,
            **request.options,
        )
        return stats.astype(request.zeros.dtype)

    def shared_step(
        state: BalancedTrainState, batch: Any, request: _StatisticRequest
    ) -> tuple[BalancedTrainState, Metrics]:
        # statistic_at="current", gradient statistics: one forward and K backward passes give both
        # the statistic and, as their weighted sum, the step's gradient.
        weights = get_weights(state.opt_state)
        out, per_component = per_component_grads(loss_components_fn, has_aux=has_aux, vmap_vjps=False)(
            state.params, batch
        )
        losses, aux = out if has_aux else (out, None)
        if axis_name is not None:
            # Average before combining: the statistic is non-linear in the gradients.
            losses, per_component = jax.lax.pmean((losses, per_component), axis_name)
        w = check_losses_match_weights(losses, weights)
        grads = jax.tree.map(lambda g: jnp.tensordot(w.astype(g.dtype), g, axes=1), per_component)
        values = (jnp.vdot(w, losses), losses) + ((aux,) if has_aux else ())
        grouped = jax.tree.map(lambda g: group_sum(g, request.groups), per_component)
        stats = statistic_from_grads(
            request.kind, grouped, losses=group_sum(losses, request.groups), **request.options
        )
        return finish(state, weights, values, grads, stats.astype(request.zeros.dtype))

    def updated_step(
        state: BalancedTrainState, batch: Any, request: _StatisticRequest
    ) -> tuple[BalancedTrainState, Metrics]:
        # statistic_at="updated": the statistic at the parameters after this step's update, on
        # the same batch. The optimizer's updates do not depend on the statistic (the balancer
        # only passes the gradient through), so a first call with the zero statistic gives the
        # updated parameters; its work is the same as the second call's, which XLA's common
        # subexpression elimination can share.
        weights, values, grads = weighted_grads(state, batch)
        updates, _ = state.tx.update(
            grads, state.opt_state, state.params, losses=values[1], statistics=request.zeros
        )
        stats = statistic_at(optax.apply_updates(state.params, updates), batch, request)
        return finish(state, weights, values, grads, stats)

    def step(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
        if not isinstance(state, BalancedTrainState):
            raise TypeError(
                f"`state` must be a softadapt_jax.training.BalancedTrainState, got {type(state).__name__}: "
                "Flax's own TrainState.apply_gradients does not pass the losses to the optimizer, so "
                "the balancer would never see them. Create it with BalancedTrainState.create(...)."
            )
        request = _statistic_request(state.opt_state)
        if request is None:
            return balanced_step(state, batch, None)

        def with_statistic(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
            if request.statistic_at == "updated":
                return updated_step(state, batch, request)
            if request.kind in GRADIENT_STATISTICS:
                return shared_step(state, batch, request)
            return balanced_step(state, batch, statistic_at(state.params, batch, request))

        def without_statistic(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
            # Zeros give non-finite estimates, which the built-in rules skip: a due balancer
            # keeps its weights.
            return balanced_step(state, batch, request.zeros)

        if recompute is not None:
            return (with_statistic if recompute else without_statistic)(state, batch)

        # The whole step goes under the cond, not just the statistic: on XLA:CPU, work
        # beside a cond ran 20-40% slower than the same work alone (micro-benchmark), while
        # under a cond around everything a hold step measured 0.90x a fixed-weight step with
        # one forward pass per loss term and 1.02x with one shared forward pass
        # (benchmarks/RESULTS.md, section 2).
        return jax.lax.cond(request.due, with_statistic, without_statistic, state, batch)

    return step


class _Schedule(NamedTuple):
    """Host copy of the counters that decide a balancer's next recompute, and its static schedule."""

    count: int
    filled: int
    accum_count: int
    window: int
    update_every: int
    accumulate: int
    update_first: bool

    @property
    def due(self) -> bool:
        """Whether the step on a state with these counters recomputes (``BalancerState.recompute_next``)."""
        push = self.accum_count + 1 >= self.accumulate
        full = min(self.filled + 1, self.window) >= self.window
        phase = 0 if self.update_first else self.update_every - 1
        return push and full and self.count % self.update_every == phase

    def advanced(self) -> _Schedule:
        """The counters after one accepted step (as ``make_balancer``'s update moves them)."""
        accum_count = self.accum_count + 1
        push = accum_count >= self.accumulate
        filled = min(self.filled + 1, self.window) if push else self.filled
        # Positional construction: a third of the host time of _replace, on every step.
        accum_count = 0 if push else accum_count
        return _Schedule(
            self.count + 1,
            filled,
            accum_count,
            self.window,
            self.update_every,
            self.accumulate,
            self.update_first,
        )


def _read_schedule(bstate: Any) -> _Schedule | None:
    """The balancer's counters, read from the device (this waits for them), and its schedule.

    ``None`` when the balancer's method state does not declare a static
    ``schedule`` (``(window, update_every, accumulate[, update_first])``).
    """
    schedule = getattr(bstate.method_state, "schedule", None)
    if schedule is None:
        return None
    window, update_every, accumulate, *rest = schedule
    update_first = bool(rest[0]) if rest else False
    # One transfer of the three counters (replica 0 of a replicated state).
    counters = jax.device_get((bstate.count, bstate.filled, bstate.accum_count))
    count, filled, accum_count = (int(np.asarray(c).reshape(-1)[0]) for c in counters)
    return _Schedule(count, filled, accum_count, window, update_every, accumulate, update_first)


class ScheduledTrainStep:
    """A jitted train step that decides on the host which steps compute the gradient statistic.

    Built by :func:`jit_train_step`. Call it as ``state, metrics = step(state, batch)``.

    Attributes:
      hold_step: the jitted step without the statistic (one backward pass, no
        conditional); also the step of balancers that need no statistic.
      recompute_step: the jitted step that computes the statistic.
      cond_step: the jitted ``lax.cond`` step, used when the balancer's
        schedule is unknown (a custom balancer without a ``schedule``).
      syncs: how many times the step waited for the device to read the
        balancer's counters.
    """

    def __init__(self, make: Callable[[bool | None], Callable[..., Any]], donate_state: bool) -> None:
        donate = (0,) if donate_state else ()
        self.hold_step = jax.jit(make(False), donate_argnums=donate)
        self.recompute_step = jax.jit(make(True), donate_argnums=donate)
        self.cond_step = jax.jit(make(None), donate_argnums=donate)
        self.syncs = 0
        self._mode = "unknown"  # "plain", "cond" or "scheduled", set by _sync
        self._schedule: _Schedule | None = None
        self._last_opt_state: Any = None
        self._last_recomputed = False

    def precompile(self, state: BalancedTrainState, batch: Any) -> None:
        """Compiles the steps ``state`` will need now rather than at their first call.

        Without it the recompute step compiles on the first recompute, in the
        middle of a run (which matters when timing one).
        """
        bstate = _statistic_balancer(state.opt_state)
        if bstate is None:
            steps = [self.hold_step]
        elif getattr(bstate.method_state, "schedule", None) is None:
            steps = [self.cond_step]
        else:
            steps = [self.hold_step, self.recompute_step]
        for fn in steps:
            fn.lower(state, batch).compile()

    def _sync(self, state: BalancedTrainState) -> None:
        # Kept to host-side work and one read of the counters: it runs after the queue of
        # dispatched steps has drained, while the device waits for the next one.
        self._last_recomputed = False
        bstate = _statistic_balancer(state.opt_state)
        if bstate is None:
            self._mode, self._schedule = "plain", None
            return
        self.syncs += 1
        self._schedule = _read_schedule(bstate)
        self._mode = "cond" if self._schedule is None else "scheduled"

    def __call__(self, state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
        # The counters are read from the device only for a state this object did not return,
        # and after a recompute step that a hold step would follow (its losses may have been
        # rejected, leaving the balancer due). Otherwise the host copy is exact or ahead: a
        # rejected step does not advance the balancer, so it is never due before the copy
        # says. A recompute step on a state that is not due is harmless (the balancer then
        # ignores the statistic); a hold step on a due state never runs.
        if state.opt_state is not self._last_opt_state:
            self._sync(state)
        if self._mode == "scheduled":
            assert self._schedule is not None
            due = self._schedule.due
            if not due and self._last_recomputed:
                self._sync(state)
                due = self._schedule.due
            state, metrics = (self.recompute_step if due else self.hold_step)(state, batch)
            self._schedule = self._schedule.advanced()
            self._last_recomputed = due
        else:
            state, metrics = (self.hold_step if self._mode == "plain" else self.cond_step)(state, batch)
        self._last_opt_state = state.opt_state
        return state, metrics


def jit_train_step(
    loss_components_fn: LossComponentsFn,
    *,
    has_aux: bool = False,
    residuals_fn: Callable[..., Any] | None = None,
    donate_state: bool = False,
) -> ScheduledTrainStep:
    """The jitted single-device train step, with the statistic schedule decided on the host.

    For balancers that need a gradient statistic, ``jax.jit(make_train_step(f))``
    puts the whole step under a ``lax.cond`` on the balancer's
    ``recompute_next``; this compiles the step without the statistic and the
    step with it separately, and calls the right one from a host copy of the
    balancer's schedule. Hold steps then run no conditional, and the host
    waits for the device only after each recompute step (to learn whether
    its losses were accepted) and for a state it did not return itself (e.g.
    one restored from a checkpoint). The results equal those of
    ``jax.jit(make_train_step(f))``, non-finite losses included. Balancers
    without a statistic get the plain jitted step.

    Args:
      loss_components_fn: ``f(params, batch) -> losses [K]`` (see :func:`make_train_step`).
      has_aux: whether ``f`` returns ``(losses, aux)``.
      residuals_fn: per-point residuals, for the NTK balancer.
      donate_state: donate the input state's buffers to the step (the caller
        must not use a state after passing it in).

    Returns:
      A :class:`ScheduledTrainStep`: ``step(state, batch) -> (state, metrics)``.

    Example:
      >>> step = jit_train_step(loss_components)  # doctest: +SKIP
      >>> for batch in batches:  # doctest: +SKIP
      ...     state, metrics = step(state, batch)
    """

    def make(recompute: bool | None) -> Callable[..., Any]:
        return make_train_step(
            loss_components_fn, has_aux=has_aux, residuals_fn=residuals_fn, recompute=recompute
        )

    return ScheduledTrainStep(make, donate_state)


def make_pmap_train_step(
    loss_components_fn: LossComponentsFn,
    *,
    axis_name: str = "devices",
    has_aux: bool = False,
    residuals_fn: Callable[..., Any] | None = None,
) -> Callable[[BalancedTrainState, Any], tuple[BalancedTrainState, Metrics]]:
    """The train step under ``jax.pmap``: replicated state, batch sharded on axis 0.

    Losses and gradients are averaged with ``lax.pmean`` before they reach the
    balancer, so every replica holds the same history and weights. Works
    unchanged across processes (``jax.distributed.initialize``).

    Args:
      loss_components_fn: as in :func:`make_train_step`.
      axis_name: name of the mapped axis.
      has_aux, residuals_fn: as in :func:`make_train_step`.

    Returns:
      ``pstep(replicated_state, sharded_batch) -> (replicated_state, metrics)``
      where every leaf of the batch has shape ``[local_devices, per_device, ...]``
      (see :func:`shard_batch`).
    """
    step = make_train_step(
        loss_components_fn, axis_name=axis_name, has_aux=has_aux, residuals_fn=residuals_fn
    )
    pstep = jax.pmap(step, axis_name=axis_name)

    def checked(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
        # pmap's own error for a batch without the device axis is a bare shape mismatch.
        n_dev = jax.local_device_count()
        for name, tree in (("batch", batch), ("state", state)):
            shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(tree)}
            bad = sorted(sh for sh in shapes if not sh or sh[0] != n_dev)
            if bad:
                fix = "shard_batch(batch)" if name == "batch" else "replicate(state)"
                raise ValueError(
                    f"make_pmap_train_step: every leaf of `{name}` needs a leading axis of the "
                    f"{n_dev} local devices; got shapes {bad[:3]}. Pass it through "
                    f"softadapt_jax.training.{fix}."
                )
        return pstep(state, batch)

    return checked


def replicate(tree: Any) -> Any:
    """Copies ``tree`` onto every local device (a leading axis of local device count)."""
    return flax.jax_utils.replicate(tree)


def unreplicate(tree: Any) -> Any:
    """Takes replica 0 of a replicated ``tree``."""
    return flax.jax_utils.unreplicate(tree)


def shard_batch(batch: Any, num_devices: int | None = None) -> Any:
    """Reshapes every leaf ``[N, ...]`` to ``[num_devices, N // num_devices, ...]``.

    Args:
      batch: a pytree of arrays sharing the leading batch axis N.
      num_devices: default ``jax.local_device_count()``.

    Returns:
      The reshaped pytree (for :func:`make_pmap_train_step`).

    Raises:
      ValueError: if N does not divide by ``num_devices`` or leaves disagree on N.
    """
    n_dev = jax.local_device_count() if num_devices is None else num_devices
    leaves = jax.tree.leaves(batch)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = [tuple(np.shape(x)) for x in leaves]
        raise ValueError(f"`batch` leaves must share a leading batch axis; got shapes {shapes}.")
    (n,) = sizes
    if n % n_dev:
        raise ValueError(
            f"`batch` has leading axis {n}, which does not divide by the {n_dev} devices; "
            f"use a batch size that is a multiple of {n_dev}."
        )
    return jax.tree.map(lambda x: x.reshape(n_dev, n // n_dev, *np.shape(x)[1:]), batch)


def data_mesh(devices: Any = None, axis_name: str = "data") -> Mesh:
    """A 1-D device mesh for data parallelism (default: all devices)."""
    devs = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devs.reshape(-1), (axis_name,))


def make_sharded_train_step(
    loss_components_fn: LossComponentsFn,
    mesh: Mesh,
    *,
    axis_name: str | None = None,
    has_aux: bool = False,
    residuals_fn: Callable[..., Any] | None = None,
) -> tuple[Callable[[BalancedTrainState, Any], tuple[BalancedTrainState, Metrics]], Callable[..., Any]]:
    """The train step under ``jax.jit`` with ``NamedSharding``: data-parallel over ``mesh``.

    The state is replicated and the batch split on its leading axis; XLA
    inserts the cross-device reductions, so the losses the balancer sees are
    the global-batch losses, identical on every device.

    Args:
      loss_components_fn: as in :func:`make_train_step`.
      mesh: a 1-D mesh (see :func:`data_mesh`).
      axis_name: the mesh axis the batch is split over (default: the mesh's
        only axis).
      has_aux, residuals_fn: as in :func:`make_train_step`.

    Returns:
      ``(step, place)``: the jitted step, and ``place(state, batch)`` which
      puts a host state and a global batch on the mesh (raising ValueError if
      the batch does not divide by the mesh size).
    """
    data_axis = axis_name or mesh.axis_names[0]
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec(data_axis))
    n_dev = mesh.shape[data_axis]

    def place(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Any]:
        shard_batch(batch, n_dev)  # validates divisibility with a clear message
        return jax.device_put(state, replicated), jax.device_put(batch, split)

    step = jax.jit(
        make_train_step(loss_components_fn, has_aux=has_aux, residuals_fn=residuals_fn),
        in_shardings=(replicated, split),
        out_shardings=(replicated, replicated),
    )
    return step, place


save_checkpoint = checkpoints.save_checkpoint
restore_checkpoint = checkpoints.restore_checkpoint
CheckpointError = checkpoints.CheckpointError
