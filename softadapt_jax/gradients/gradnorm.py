"""GradNorm (Chen et al. 2018, arXiv:1711.02257) as an optax transform.

GradNorm learns loss weights ``w`` so that the gradient norms of the weighted
losses on one chosen shared layer W, ``G_k = ||grad_W w_k L_k|| = w_k n_k``,
match a common target that favours the components which train slowest::

    Lhat_k = L_k(t) / L_k(0)               (inverse training rate)
    r_k    = Lhat_k / mean_j Lhat_j         (relative inverse training rate)
    G_avg  = mean_k w_k n_k
    L_grad = sum_k | w_k n_k - G_avg r_k^alpha |     (the target held constant)

Each step the network update uses the current weights, ``sum_k w_k g_k``;
then ``w`` takes one step of its own optax optimizer on ``dL_grad/dw`` and is
renormalised to sum to K. The state keeps the weights, ``L(0)`` and the inner
optimizer's state.

Two ways to feed it, as for the balancers in :mod:`softadapt_jax.transform`:

(a) ``per_component=True`` (default): ``updates`` are the stacked per-component
    gradients ``[K, ...]``; the layer norms ``n_k`` are read from them.
(b) ``per_component=False``: ``updates`` are already the gradient of
    ``sum_k w_k L_k`` (one VJP with :func:`gradnorm_weights` of the state as
    cotangent); pass the unweighted layer norms as the extra argument
    ``layer_norms`` (from :func:`layer_grad_norms`, which needs per-component
    gradients of that one layer only).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softadapt_jax._checks import check_positive_int, check_vector
from softadapt_jax.gradients.per_component import per_component_grads

Layer = Callable[[Any], Any] | str | Sequence[Any]


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`."""

    weights: jax.Array  # [K], sum K; the weights the *next* update applies
    initial_losses: jax.Array  # [K], L(0), recorded at the first update
    count: jax.Array  # int32, number of updates so far
    inner_state: optax.OptState  # the weight optimizer's state


def gradnorm(
    *,
    num_losses: int,
    layer: Layer,
    alpha: float = 1.5,
    weight_optimizer: optax.GradientTransformation | None = None,
    per_component: bool = True,
    min_weight: float = 1e-3,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """GradNorm: learn loss weights that equalise the gradient norms on a shared layer.

    Args:
      num_losses: K.
      layer: the shared layer W whose gradient norms are equalised, usually
        the last shared one: a function ``tree -> subtree`` (applied to the
        updates, which have the parameters' structure), a key path string
        such as ``"params/Dense_2/kernel"`` or ``"Dense_2"`` (all leaves
        below), or a tuple of keys.
      alpha: asymmetry; 0 equalises the norms, larger values push the slow
        components harder (the paper uses 0.12 to 3; 1.5 is its common value).
      weight_optimizer: optimizer of the weights; default
        ``optax.adam(0.025)`` (the paper trains the weights with the network's
        optimizer; a separate one keeps their step size independent).
      per_component: path (a) if True, path (b) if False (module docstring).
      min_weight: after each step the weights are clipped to at least
        ``min_weight`` before renormalising, so a weight never turns negative
        (the paper only renormalises; a negative weight would ascend its loss).
      axis_name: pmap axis over which updates, losses and layer norms are
        averaged first, so every replica holds the same weights.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
      ``updates, state, params=None, *, losses`` (``[K]``) and, with
      ``per_component=False``, ``layer_norms`` (``[K]``).

    Example:
      >>> import optax
      >>> from softadapt_jax.gradients import gradnorm
      >>> tx = optax.chain(gradnorm(num_losses=2, layer="Dense_1"), optax.adam(1e-3))
    """
    k = check_positive_int(num_losses, "num_losses")
    if not (callable(layer) or isinstance(layer, (str, tuple, list))) or (
        isinstance(layer, (str, tuple, list)) and len(layer) == 0
    ):
        raise ValueError(
            f"`layer` must be a callable, a non-empty key path string or a tuple of keys; got {layer!r}."
        )
    alpha = _check_float(alpha, "alpha", minimum=0.0)
    min_weight = _check_float(min_weight, "min_weight", minimum=0.0)
    if min_weight >= 1:
        raise ValueError(
            f"`min_weight` must be < 1 so that weights summing to K can respect it; got {min_weight}."
        )
    if not isinstance(per_component, bool):
        raise ValueError(f"`per_component` must be a bool, got {per_component!r}.")
    opt = optax.adam(0.025) if weight_optimizer is None else weight_optimizer

    def init_fn(params: Any) -> GradNormState:
        del params
        weights = jnp.ones((k,), jnp.float32)
        return GradNormState(
            weights=weights,
            initial_losses=jnp.ones((k,), jnp.float32),
            count=jnp.zeros((), jnp.int32),
            inner_state=opt.init(weights),
        )

    def update_fn(
        updates: Any,
        state: GradNormState,
        params: Any = None,
        *,
        losses: Any = None,
        layer_norms: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, GradNormState]:
        del extra_args, params
        if losses is None:
            raise ValueError(
                f"gradnorm needs the current component losses: call `update(updates, state, params, "
                f"losses=losses)` with `losses` of shape ({k},)."
            )
        losses = check_vector(losses, "losses", k)
        if not per_component and layer_norms is None:
            raise ValueError(
                "gradnorm(per_component=False) needs the unweighted per-component gradient norms of the "
                "chosen layer: pass `layer_norms` ([K], see layer_grad_norms)."
            )
        if axis_name is not None:
            # Average before taking norms: the norm of the mean is what the global batch gives.
            updates, losses = jax.lax.pmean((updates, losses), axis_name)
            if layer_norms is not None:
                layer_norms = jax.lax.pmean(layer_norms, axis_name)
        if per_component:
            norms = component_norms(updates, layer)
            if norms.shape != (k,):
                raise ValueError(
                    f"gradnorm(num_losses={k}) got updates stacked on a leading axis of size "
                    f"{norms.shape[0]}."
                )
        else:
            norms = check_vector(layer_norms, "layer_norms", k)
        weights = state.weights
        if per_component:
            updates = jax.tree.map(lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), updates)
        new_weights, initial, inner = gradnorm_step(
            weights,
            losses,
            norms,
            state.initial_losses,
            state.count,
            state.inner_state,
            opt,
            alpha,
            min_weight,
        )
        return updates, GradNormState(new_weights, initial, state.count + 1, inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gradnorm_weights(opt_state: Any) -> jax.Array:
    """The weights ``[K]`` (summing to K) the GradNorm state in ``opt_state`` applies next.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`GradNormState`, or several.
    """
    found = [
        n
        for n in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GradNormState))
        if isinstance(n, GradNormState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected exactly one GradNormState in `opt_state`, found {len(found)}.")
    return jax.lax.stop_gradient(found[0].weights)


def layer_grad_norms(
    loss_components_fn: Callable[..., Any], layer: Layer, argnums: int = 0, has_aux: bool = False
) -> Callable[..., tuple[Any, jax.Array]]:
    """The unweighted per-component gradient norms ``n_k = ||grad_W L_k||`` of one layer W.

    Only W's gradients are kept from the batched VJPs, so under ``jax.jit``
    XLA drops the rest of the K backward passes below W: for the last shared
    layer they run through the heads and W only.

    Returns:
      ``g(*args) -> (losses, norms)`` (``((losses, aux), norms)`` with
      ``has_aux``), ``norms`` of shape ``[K]``.
    """
    pcg = per_component_grads(loss_components_fn, argnums, has_aux)

    def wrapped(*args: Any) -> tuple[Any, jax.Array]:
        values, grads = pcg(*args)
        return values, component_norms(grads, layer)

    return wrapped


def component_norms(stacked_grads: Any, layer: Layer) -> jax.Array:
    """``[K]`` Euclidean norms of each component's gradient restricted to ``layer``.

    Args:
      stacked_grads: per-component gradients, leaves ``[K, ...]``.
      layer: as in :func:`gradnorm`.

    Raises:
      ValueError: the layer path does not exist or selects no array.
    """
    leaves = jax.tree.leaves(select_layer(stacked_grads, layer))
    if not leaves:
        raise ValueError(f"`layer` {layer!r} selects no gradient leaf.")
    sizes = {jnp.shape(g)[0] if jnp.ndim(g) else None for g in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"the gradients of `layer` {layer!r} must be stacked on a common leading axis K; got shapes "
            f"{[tuple(jnp.shape(g)) for g in leaves]}."
        )
    sq = sum(jnp.sum(jnp.reshape(g, (g.shape[0], -1)).astype(jnp.float32) ** 2, axis=1) for g in leaves)
    return jnp.sqrt(sq)


def select_layer(tree: Any, layer: Layer) -> Any:
    """The subtree of ``tree`` at ``layer`` (a callable, a ``"a/b/c"`` path, or a tuple of keys)."""
    if callable(layer):
        return layer(tree)
    keys = layer.split("/") if isinstance(layer, str) else list(layer)
    node = tree
    for depth, key in enumerate(keys):
        try:
            if isinstance(node, Mapping):
                node = node[key]
            elif isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
                node = node[int(key)]
            else:
                node = getattr(node, key)
        except (KeyError, IndexError, AttributeError, ValueError, TypeError):
            where = "/".join(map(str, keys[:depth])) or "<root>"
            available = sorted(map(str, node.keys())) if isinstance(node, Mapping) else type(node).__name__
            raise ValueError(
                f"`layer` path {layer!r}: no key {key!r} under {where}; available: {available}."
            ) from None
    return node


def _check_float(value: Any, name: str, *, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"`{name}` must be a float >= {minimum}, got {value!r}.")
    if not np.isfinite(value) or value < minimum:
        raise ValueError(f"`{name}` must be a finite float >= {minimum}, got {value!r}.")
    return float(value)


# --- pure functions -----------------------------------------------------------------------------------


def gradnorm_targets(
    weights: jax.Array, losses: jax.Array, norms: jax.Array, initial_losses: jax.Array, alpha: float
) -> jax.Array:
    """``G_avg * r_k^alpha``: GradNorm's target norms (a constant for the weight update)."""
    ratio = losses / jnp.where(initial_losses != 0, initial_losses, 1.0)
    mean = jnp.mean(ratio)
    rel = ratio / jnp.where(mean != 0, mean, 1.0)
    # A loss that went below zero has no meaningful rate; clamp so that r^alpha stays real.
    rel = jnp.maximum(rel, 0.0)
    g_avg = jnp.mean(weights * norms)
    return jax.lax.stop_gradient(g_avg * rel**alpha)


def gradnorm_step(
    weights: jax.Array,
    losses: jax.Array,
    norms: jax.Array,
    initial_losses: jax.Array,
    count: jax.Array,
    inner_state: optax.OptState,
    optimizer: optax.GradientTransformation,
    alpha: float,
    min_weight: float,
) -> tuple[jax.Array, jax.Array, optax.OptState]:
    """One weight update: returns ``(new_weights, initial_losses, inner_state)``.

    ``initial_losses`` are taken from ``losses`` at the first step (``count == 0``).
    """
    k = weights.shape[0]
    losses = jax.lax.stop_gradient(losses.astype(jnp.float32))
    norms = jax.lax.stop_gradient(norms.astype(jnp.float32))
    initial = jnp.where(count == 0, losses, initial_losses)
    targets = gradnorm_targets(weights, losses, norms, initial, alpha)

    def l_grad(w: jax.Array) -> jax.Array:
        return jnp.sum(jnp.abs(w * norms - targets))

    grad = jax.grad(l_grad)(weights)
    upd, inner_state = optimizer.update(grad, inner_state, weights)
    new = jnp.maximum(optax.apply_updates(weights, upd), min_weight)
    new = k * new / jnp.sum(new)
    return new, initial, inner_state
