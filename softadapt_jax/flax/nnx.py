"""The train step for Flax NNX models: a balancer inside ``nnx.Optimizer``, BatchNorm and dropout kept.

NNX models carry their own state (BatchNorm statistics, dropout RNG counters)
and ``nnx.Optimizer.update(model, grads, **kwargs)`` forwards keyword
arguments to ``tx.update``, so a balancer in the optax chain receives
``losses=`` as with Linen. :func:`make_nnx_train_step` builds the step::

    model = MyModel(rngs=nnx.Rngs(0))
    tx = optax.chain(sj.softadapt(0.1, num_losses=3), optax.adam(1e-3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = nnx.jit(make_nnx_train_step(loss_components))   # loss_components(model, batch) -> [K]
    for batch in batches:
        metrics = step(model, optimizer, batch)

One forward and one backward pass per step (the gradient of ``sum_k w_k L_k``
with the weights held in the optimizer state). Like the Linen steps, it is
guarded: a step whose losses or gradients are not finite leaves the model
(parameters, BatchNorm statistics, RNG state) and the optimizer exactly as
they were, counts the step in the balancer's ``rejected``, and reports it in
``metrics["skipped"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from softadapt_jax.guard import all_finite, count_skipped, keep_if, step_metrics
from softadapt_jax.transform import check_losses_match_weights, get_weights


def make_nnx_train_step(
    loss_components_fn: Callable[[Any, Any], Any],
    *,
    has_aux: bool = False,
    guard: bool = True,
) -> Callable[[Any, nnx.Optimizer, Any], dict[str, jax.Array]]:
    """Builds ``step(model, optimizer, batch) -> metrics`` for an NNX model (wrap it in ``nnx.jit``).

    Args:
      loss_components_fn: ``f(model, batch) -> losses [K]`` (or ``(losses,
        aux)`` with ``has_aux``), run in training mode (``model.train()``):
        it may update BatchNorm statistics and draw dropout masks.
      has_aux: whether ``f`` returns auxiliary outputs (``metrics["aux"]``).
      guard: skip steps with non-finite losses or gradients (the module
        docstring); ``False`` applies every step as it comes.

    Returns:
      The step. It updates ``model`` and ``optimizer`` in place and returns
      ``metrics`` with ``losses`` ``[K]``, ``weights`` ``[K]`` (those used in
      this step), ``total`` (``sum_k w_k L_k``), ``loss`` (the plain sum) and
      ``skipped`` (bool).

    Raises:
      ValueError: (at trace time) the optimizer holds no balancer (or more
        than one), or the losses are not ``[K]``.
    """

    def step(model: Any, optimizer: nnx.Optimizer, batch: Any) -> dict[str, jax.Array]:
        weights = get_weights(nnx.as_pure(optimizer.opt_state))
        # Snapshots (arrays are immutable, so these are the values before the step).
        old_model = nnx.as_pure(nnx.state(model))
        old_opt_state = nnx.as_pure(optimizer.opt_state)
        old_step = optimizer.step[...]

        def weighted(m: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            out = loss_components_fn(m, batch)
            losses, aux = out if has_aux else (out, None)
            w = check_losses_match_weights(losses, weights)
            return jnp.vdot(w, losses), (losses, aux)

        (total, (losses, aux)), grads = nnx.value_and_grad(weighted, has_aux=True)(model)
        optimizer.update(model, grads, losses=losses)
        ok = all_finite(losses, nnx.as_pure(grads)) if guard else jnp.asarray(True)
        if guard:
            nnx.update(model, keep_if(ok, nnx.as_pure(nnx.state(model)), old_model))
            opt_state = keep_if(ok, nnx.as_pure(optimizer.opt_state), count_skipped(old_opt_state))
            nnx.update(optimizer.opt_state, nnx.state(opt_state))
            optimizer.step[...] = jnp.where(ok, optimizer.step[...], old_step)
        return step_metrics(losses, weights, total, ok, aux, has_aux=has_aux)

    return step
