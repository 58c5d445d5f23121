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

* one device: ``jax.jit(make_train_step(fn))``;
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

import os
from collections.abc import Callable
from typing import Any

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from softadapt_jax.gradients.per_component import per_component_grads
from softadapt_jax.statistics import compute_statistic, statistic_from_grads, statistic_shape
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


def _statistic_request(opt_state: Any) -> tuple[str, dict[str, Any], jax.Array, jax.Array] | None:
    """``(kind, options, due, zeros)`` for the one balancer in ``opt_state`` that needs a statistic.

    ``None`` when no balancer (or more than one) asks for a gradient statistic.
    """
    states = find_balancer_states(opt_state)
    kind = getattr(states[0].method_state, "statistic", None) if len(states) == 1 else None
    if kind is None:
        return None
    bstate = states[0]
    options = dict(getattr(bstate.method_state, "statistic_options", ()))
    zeros = jnp.zeros(statistic_shape(kind, bstate.weights.shape[0]), bstate.weights.dtype)
    return kind, options, bstate.recompute_next, zeros


def make_train_step(
    loss_components_fn: LossComponentsFn,
    *,
    axis_name: str | None = None,
    has_aux: bool = False,
    residuals_fn: Callable[..., Any] | None = None,
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
        needed only by the NTK balancer. It must work row by row: given a
        one-row batch (row i of every leaf) it returns point i of each
        residual, as PINN collocation sets do.

    Balancers that need a gradient statistic (learning-rate annealing,
    gradient-norm, NTK weighting) get it computed only on the steps that
    recompute their weights: the step is a ``lax.cond`` between the plain step
    (one backward pass) and the plain step plus the statistic.

    Returns:
      A pure step function; ``metrics`` holds ``losses`` ``[K]``, ``weights``
      ``[K]`` (the ones used in this step), ``total`` (``sum_k w_k L_k``) and
      ``loss`` (the plain sum).

    Raises:
      ValueError (at trace time): the loss function's output is not ``[K]``
        with K the balancer's number of losses.
    """

    plain_fn = (lambda p, b: loss_components_fn(p, b)[0]) if has_aux else loss_components_fn

    def finish(
        state: BalancedTrainState,
        weights: jax.Array,
        values: tuple[Any, ...],
        grads: Any,
        statistics: jax.Array | None,
    ) -> tuple[BalancedTrainState, Metrics]:
        total, losses = values[0], values[1]
        state = state.apply_gradients(grads=grads, losses=losses, statistics=statistics)
        metrics = {"losses": losses, "weights": weights, "total": total, "loss": jnp.sum(losses)}
        if has_aux:
            metrics["aux"] = values[2]
        return state, metrics

    def balanced_step(
        state: BalancedTrainState, batch: Any, statistics: jax.Array | None
    ) -> tuple[BalancedTrainState, Metrics]:
        weights = get_weights(state.opt_state)
        grad_fn = value_and_weighted_grad(loss_components_fn, argnums=0, has_aux=has_aux)
        values, grads = grad_fn(weights, state.params, batch)
        if axis_name is not None:
            (total, losses), grads = jax.lax.pmean((values[:2], grads), axis_name)
            values = (total, losses, *values[2:])
        return finish(state, weights, values, grads, statistics)

    def per_component_step(
        state: BalancedTrainState, batch: Any, kind: str, dtype: Any
    ) -> tuple[BalancedTrainState, Metrics]:
        # One forward and K backward passes give both the statistic and, as their weighted sum,
        # the step's gradient: no separate weighted backward pass on the recompute steps.
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
        stats = statistic_from_grads(kind, per_component).astype(dtype)
        return finish(state, weights, values, grads, stats)

    def step(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
        request = _statistic_request(state.opt_state)
        if request is None:
            return balanced_step(state, batch, None)
        kind, options, due, zeros = request

        def with_statistic(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
            if kind != "ntk_trace":
                return per_component_step(state, batch, kind, zeros.dtype)
            stats = compute_statistic(
                kind, plain_fn, state.params, batch, residuals_fn=residuals_fn, axis_name=axis_name, **options
            )
            return balanced_step(state, batch, stats.astype(zeros.dtype))

        def without_statistic(state: BalancedTrainState, batch: Any) -> tuple[BalancedTrainState, Metrics]:
            return balanced_step(state, batch, zeros)

        # The whole step goes under the cond, not just the statistic: on XLA:CPU, work
        # beside a cond ran 20-40% slower than the same work alone (micro-benchmark), while
        # under a cond around everything a hold step costs within 1-4% of a fixed-weight
        # step (benchmarks/RESULTS.md, section 2).
        return jax.lax.cond(due, with_statistic, without_statistic, state, batch)

    return step


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
    return jax.pmap(step, axis_name=axis_name)


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


def save_checkpoint(path: str | os.PathLike[str], state: Any) -> None:
    """Writes ``state`` (train state, balancer included) as msgpack bytes.

    The file is written to a temporary name and renamed, so a crash never
    leaves a half-written checkpoint.
    """
    data = flax.serialization.to_bytes(jax.device_get(state))
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def restore_checkpoint(path: str | os.PathLike[str], target: Any) -> Any:
    """Reads a checkpoint written by :func:`save_checkpoint` into the structure of ``target``."""
    with open(path, "rb") as f:
        return flax.serialization.from_bytes(target, f.read())
