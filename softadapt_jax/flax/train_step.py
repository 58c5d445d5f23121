"""The one train step for Flax (Linen) train states, and the helpers of its multi-device recipes.

One step, whatever the device layout, reads top to bottom:

1. read the weights the balancer holds (computed from past losses only);
2. one forward and one backward pass: the gradient of ``sum_k w_k L_k`` as a
   VJP of the loss vector with ``w`` as cotangent;
3. on several devices, average losses and gradients across them, so every
   replica feeds the same numbers to its balancer;
4. ``tx.update(grads, opt_state, params, losses=losses)`` records the losses
   and updates the weights for the next step.

The step is pure and built once, by :func:`make_train_step`; the layout is
the caller's choice of wrapper:

* one device::

    step = jax.jit(make_train_step(loss_fn, balancer=b))

* ``jax.pmap`` (also across processes started with
  ``jax.distributed.initialize``; each process passes its local shard)::

    pstep = jax.pmap(make_train_step(loss_fn, balancer=b, axis_name="d"), axis_name="d")
    state, metrics = pstep(replicate(state), shard_batch(batch))

  (:func:`make_pmap_train_step` is this plus a check of the inputs' device axis);

* ``jax.jit`` with ``NamedSharding`` (the current recommendation)::

    rep, split = data_shardings(data_mesh())
    step = jax.jit(make_train_step(loss_fn, balancer=b), in_shardings=(rep, split),
                   out_shardings=(rep, rep))
    state, batch = jax.device_put(state, rep), jax.device_put(batch, split)

  XLA inserts the cross-device reductions, so the balancer sees the
  global-batch losses on every device.
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from softadapt_jax.balancers.base import Balancer, group_sum
from softadapt_jax.balancers.gradient_weighting import GradientWeightingState
from softadapt_jax.flax.train_state import BalancedTrainState
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


class _StatisticRequest(NamedTuple):
    """What the train step needs to know about the balancer that asks for a gradient statistic."""

    kind: str
    options: dict[str, Any]
    groups: tuple[int, ...] | None
    statistic_at: str
    due: jax.Array
    zeros: jax.Array


def _needs_balancer(opt_state: Any) -> None:
    # The built-in gradient-statistics balancers carry a GradientWeightingState; without the
    # Balancer the step cannot know which statistic to compute, and would silently skip it.
    for bstate in find_balancer_states(opt_state):
        if isinstance(bstate.method_state, GradientWeightingState):
            raise ValueError(
                "the optimizer holds a gradient-statistics balancer (learning-rate annealing, "
                "gradient-norm or NTK weighting), but make_train_step got no `balancer`: pass the "
                "same Balancer, make_train_step(loss_fn, balancer=b), so the step computes its statistic."
            )


def _statistic_request(opt_state: Any, balancer: Balancer | None) -> _StatisticRequest | None:
    """The statistic ``balancer`` asks for, with its state's ``recompute_next``; ``None`` if none."""
    if balancer is None or balancer.statistic is None:
        if balancer is None:
            _needs_balancer(opt_state)
        return None
    expected = jax.eval_shape(balancer.init)
    want = jax.tree.structure(expected.method_state), expected.history.shape, expected.weights.shape
    states = [
        s
        for s in find_balancer_states(opt_state)
        if (jax.tree.structure(s.method_state), s.history.shape[-2:], s.weights.shape[-1:]) == want
    ]
    if len(states) != 1:
        raise ValueError(
            f"`balancer` ({balancer.name!r}, history {want[1]}, weights {want[2]}) must match exactly one "
            f"balancer state in the optimizer state; found {len(states)}. Build the optimizer with "
            "the same Balancer object (e.g. optax.chain(sj.balance(b), optax.adam(...)))."
        )
    (bstate,) = states
    # One statistic row per weight group: the history holds one column per group.
    zeros = jnp.zeros(statistic_shape(balancer.statistic, bstate.history.shape[-1]), bstate.weights.dtype)
    return _StatisticRequest(
        kind=balancer.statistic,
        options=dict(balancer.statistic_options),
        groups=balancer.groups,
        statistic_at=balancer.statistic_at,
        due=bstate.recompute_next,
        zeros=zeros,
    )


def make_train_step(
    loss_components_fn: LossComponentsFn,
    *,
    balancer: Balancer | None = None,
    axis_name: str | None = None,
    has_aux: bool = False,
    residuals_fn: Callable[..., Any] | None = None,
    guard: bool = True,
    recompute: bool | None = None,
) -> Callable[[BalancedTrainState, Any], tuple[BalancedTrainState, Metrics]]:
    """Builds the pure ``step(state, batch) -> (state, metrics)``, one backward pass per step.

    The same step serves every layout: wrap it yourself (recipes in the module
    docstring and README) in ``jax.jit``, ``jax.pmap(..., axis_name=a)``
    (built with ``axis_name=a``) or ``jax.jit`` with shardings.

    Args:
      loss_components_fn: ``f(params, batch) -> losses [K]`` (or
        ``(losses, aux)`` with ``has_aux``); each loss a mean over the batch,
        so that averaging across devices gives the global-batch loss.
      balancer: the :class:`~softadapt_jax.balancers.Balancer` inside the
        optimizer, required when it needs a gradient statistic (learning-rate
        annealing, gradient-norm, NTK weighting): its static settings say
        which statistic, with which options, evaluated where. Loss-statistics
        balancers and plain optimizers need none.
      axis_name: the ``pmap`` axis to average losses and gradients over
        (``None`` on one device or under sharded ``jit``).
      has_aux: whether ``f`` returns auxiliary outputs (put in ``metrics["aux"]``).
      residuals_fn: ``r(params, batch) -> K arrays`` of per-point residuals,
        needed only by the NTK balancer (see
        :func:`softadapt_jax.statistics.compute_statistic`: terms that work
        row by row, as PINN collocation sets do, cost one one-point backward
        pass per point).
    Balancers that need a gradient statistic (learning-rate annealing,
    gradient-norm, NTK weighting) get it computed only on the steps that
    recompute their weights, decided inside the step from the balancer state's
    ``recompute_next``: the plain step (one backward pass) with the statistic
    under a ``lax.cond`` (or, for a balancer that recomputes every step, a
    ``lax.cond`` between the plain step and the step that also computes the
    statistic), so it works anywhere (``jit``, ``pmap``, inside ``lax.scan``).

    Where the statistic is evaluated is the balancer's choice (its
    ``statistic_at``): ``"updated"`` (the original implementations)
    takes the step's weighted gradient and optimizer update as usual, then
    the statistic of the group-summed losses at the updated parameters on
    the same batch (G more backward passes); ``"current"`` takes it at the
    step's own parameters (for a balancer with ``update_every=1`` the K
    per-component backward passes of a gradient statistic also give the
    step's gradient, with no separate weighted pass). Either way the weights
    recomputed on a step apply from the next step on.

    ``recompute`` overrides that decision for callers that lay the schedule
    out statically: ``True`` builds the step that always computes the
    statistic, ``False`` the one that never does (a due balancer then gets a
    statistic of zeros, which the built-in rules read as no new estimate, so
    it keeps its weights). Under ``jax.vmap`` over independent runs (seeds)
    the ``lax.cond`` becomes a select that computes the statistic on every
    step; there, compute the recompute steps on the host with the balancer's
    own schedule, :func:`softadapt_jax.balancers.base.recompute_due`, and
    alternate the two steps (as ``examples/pinn_study.py`` does).

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
      ValueError: (at trace time) the loss function's output is not ``[K]``
        with K the balancer's number of losses.
      ValueError: (at trace time) the optimizer holds a gradient-statistics
        balancer but ``balancer`` is not given, or ``balancer`` matches no
        (or several) balancer states in it.
      TypeError: ``balancer`` is not a Balancer, ``guard`` not a bool, or
        ``state`` is not a :class:`BalancedTrainState` (Flax's own
        ``TrainState`` would drop the losses).

    Example:
      >>> b = sj.lr_annealing_balancer(num_losses=2)  # doctest: +SKIP
      >>> tx = optax.chain(sj.balance(b), optax.adam(1e-3))  # doctest: +SKIP
      >>> step = jax.jit(make_train_step(loss_components, balancer=b))  # doctest: +SKIP
    """
    if balancer is not None and not isinstance(balancer, Balancer):
        raise TypeError(f"`balancer` must be a Balancer or None, got {type(balancer).__name__}.")
    if not isinstance(guard, bool):
        raise TypeError(f"`guard` must be a bool, got {guard!r}.")
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(f"`recompute` must be None, True or False, got {recompute!r}.")

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

    def step_with_statistic(
        state: BalancedTrainState, batch: Any, request: _StatisticRequest, *, only_if_due: bool
    ) -> tuple[BalancedTrainState, Metrics]:
        # The plain step (one weighted backward pass) and the statistic of the balancer: at the
        # step's parameters, or (statistic_at="updated") at the parameters after its update, on
        # the same batch. The optimizer's updates do not depend on the statistic (the balancer
        # only passes the gradient through), so a first call with the zero statistic gives the
        # updated parameters; its work is the same as the second call's, which XLA's common
        # subexpression elimination can share. With only_if_due the statistic alone goes under
        # the cond, whose operands are then just the parameters (with the whole state passing
        # through both branches, every step would pay for moving it).
        weights, values, grads = weighted_grads(state, batch)

        def statistic(params: Any) -> jax.Array:
            if request.statistic_at == "updated":
                updates, _ = state.tx.update(
                    grads, state.opt_state, params, losses=values[1], statistics=request.zeros
                )
                params = optax.apply_updates(params, updates)
            return statistic_at(params, batch, request)

        if only_if_due:
            stats = jax.lax.cond(request.due, statistic, lambda _: request.zeros, state.params)
        else:
            stats = statistic(state.params)
        return finish(state, weights, values, grads, stats)

    def step(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
        if not isinstance(state, BalancedTrainState):
            raise TypeError(
                f"`state` must be a softadapt_jax.training.BalancedTrainState, got {type(state).__name__}: "
                "Flax's own TrainState.apply_gradients does not pass the losses to the optimizer, so "
                "the balancer would never see them. Create it with BalancedTrainState.create(...)."
            )
        request = _statistic_request(state.opt_state, balancer)
        if request is None:
            return balanced_step(state, batch, None)

        def with_statistic(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
            if request.statistic_at == "current" and request.kind in GRADIENT_STATISTICS:
                return shared_step(state, batch, request)
            return step_with_statistic(state, batch, request, only_if_due=False)

        def without_statistic(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
            # Zeros give non-finite estimates, which the built-in rules skip: a due balancer
            # keeps its weights.
            return balanced_step(state, batch, request.zeros)

        if recompute is not None:
            return (with_statistic if recompute else without_statistic)(state, batch)

        schedule = balancer.schedule if balancer is not None else None
        if schedule is not None and schedule.update_every * schedule.accumulate == 1:
            # A statistic on (almost) every step: the whole step under the cond, so that a
            # "current" gradient statistic's K backward passes also give the step's gradient.
            return jax.lax.cond(request.due, with_statistic, without_statistic, state, batch)
        return step_with_statistic(state, batch, request, only_if_due=True)

    return step


def make_pmap_train_step(
    loss_components_fn: LossComponentsFn,
    *,
    balancer: Balancer | None = None,
    axis_name: str = "devices",
    has_aux: bool = False,
    residuals_fn: Callable[..., Any] | None = None,
) -> Callable[[BalancedTrainState, Any], tuple[BalancedTrainState, Metrics]]:
    """``jax.pmap(make_train_step(..., axis_name=a), axis_name=a)``, with its inputs checked.

    The pmap recipe plus one host-side check: a batch not passed through
    :func:`shard_batch` (or a state not :func:`replicate`-d) gets an error that
    says so, instead of pmap's bare shape mismatch. Losses and gradients are
    averaged with ``lax.pmean`` before they reach the balancer, so every
    replica holds the same history and weights. Works unchanged across
    processes (``jax.distributed.initialize``).

    Args:
      loss_components_fn: as in :func:`make_train_step`.
      balancer, has_aux, residuals_fn: as in :func:`make_train_step`.
      axis_name: name of the mapped axis.

    Returns:
      ``pstep(replicated_state, sharded_batch) -> (replicated_state, metrics)``
      where every leaf of the batch has shape ``[local_devices, per_device, ...]``
      (see :func:`shard_batch`).
    """
    step = make_train_step(
        loss_components_fn, balancer=balancer, axis_name=axis_name, has_aux=has_aux, residuals_fn=residuals_fn
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


def data_shardings(mesh: Mesh, axis_name: str | None = None) -> tuple[NamedSharding, NamedSharding]:
    """``(replicated, split)``: the state's and the batch's shardings for data parallelism on ``mesh``.

    ``split`` cuts every batch leaf along its leading axis over the mesh axis
    ``axis_name`` (default: the mesh's first axis); the batch size must divide
    by that axis' size (check it with :func:`shard_batch` for a clear error).
    """
    data_axis = axis_name or mesh.axis_names[0]
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(data_axis))
