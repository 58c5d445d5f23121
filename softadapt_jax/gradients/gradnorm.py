"""GradNorm (Chen et al. 2018, arXiv:1711.02257) as an optax transform.

GradNorm learns loss weights ``w`` (summing to K) so that the gradient norms
of the weighted losses on one shared layer W, ``G_k = ||grad_W w_k L_k||``,
approach a common target that favours the components which train slowest.
Each update applies the current weights to the gradients, ``sum_k w_k g_k``,
then moves the weights' parameter one step of its own optax optimizer on the
GradNorm objective. The default reproduces LibMTL's GradNorm; PhysicsNeMo's
and a literal reading of the paper are named options (see :func:`gradnorm`).

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

from softadapt_jax._checks import check_choice, check_positive_int, check_vector
from softadapt_jax.gradients.per_component import (
    combine_leaves,
    max_abs,
    overflow_exponent,
    per_component_grads,
    power_of_two,
)

Layer = Callable[[Any], Any] | str | Sequence[Any]

GRADNORM_CONVENTIONS = ("libmtl", "physicsnemo", "paper")
"""The accepted values of ``gradnorm(convention=...)``."""

# Per convention: alpha, the initial value of the trained parameter, and the default weight optimizer.
# The optimizers are those the recorded reference runs used (see gradnorm's docstring).
_DEFAULT_ALPHA = {"libmtl": 1.5, "physicsnemo": 1.0, "paper": 1.5}
_INITIAL_PARAM = {"libmtl": 1.0, "physicsnemo": 0.0, "paper": 1.0}
_DEFAULT_OPTIMIZER = {
    "libmtl": lambda: optax.sgd(0.1),
    "physicsnemo": lambda: optax.adam(1e-2),
    "paper": lambda: optax.adam(0.025),
}


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`."""

    weights: jax.Array  # [K], sum K; the weights the *next* update applies
    param: jax.Array  # [K], what the weight optimizer trains (LibMTL loss_scale, PhysicsNeMo lmbda, or w)
    initial_losses: jax.Array  # [K], L(0) (a running mean while the initial steps last)
    count: jax.Array  # int32, number of updates so far
    inner_state: optax.OptState  # the weight optimizer's state
    rejected: jax.Array  # int32, updates skipped for non-finite losses or gradient norms


class GradNormInfo(NamedTuple):
    """Diagnostics of one ``_gradnorm_step`` (zeros while LibMTL's initial steps hold the weights)."""

    objective: jax.Array  # scalar, sum_k |w_k n_k - target_k|
    grad: jax.Array  # [K], d objective / d param, what the weight optimizer received


def gradnorm(
    *,
    num_losses: int,
    layer: Layer,
    alpha: float | None = None,
    weight_optimizer: optax.GradientTransformation | None = None,
    per_component: bool = True,
    min_weight: float | None = None,
    axis_name: Hashable | None = None,
    convention: str = "libmtl",
    initial_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GradNorm: learn loss weights that equalise the gradient norms on a shared layer.

    With ``n_k = ||grad_W L_k||`` the unweighted gradient norms on the layer W,
    ``L(0)`` the initial losses and ``w = w(p)`` the weights as a function of
    the trained parameter ``p``, one update computes::

        r_k      = (L_k / L_k(0)) / mean_j (L_j / L_j(0))   (relative inverse training rate)
        target_k = mean_j(w_j n_j) * r_k**alpha              (held constant)
        L_grad   = sum_k | w_k n_k - target_k |
        updates  = sum_k w_k g_k                             (the weights *before* this step)
        p       <- p + weight_optimizer(dL_grad/dp)          (acts from the next update on)

    ``convention`` selects ``w(p)`` and the start-up; the first two reproduce
    an original implementation (float64, rtol 1e-6, tests/test_parity_gradnorm.py):

    * ``"libmtl"`` (default): LibMTL's ``GradNorm`` (median-research-group/LibMTL
      git 4336804, ``LibMTL/weighting/GradNorm.py``). ``p`` is ``loss_scale``
      (init 1) and ``w = K softmax(p)``, so the gradient passes through the
      softmax. For the first ``initial_steps`` updates (LibMTL's epoch 0, one
      step per batch) the weights are 1 and ``p`` does not move; ``L(0)`` is
      the mean loss over those steps (LibMTL's ``train_loss_buffer[:, 0]``).
      It is the default because GradNorm is a multi-task method and LibMTL is
      the multi-task library people compare against; its alpha 1.5 is the
      paper's common value, and its weights stay positive and sum to K by
      construction, with no clipping.
    * ``"physicsnemo"``: PhysicsNeMo-Sym's ``GradNorm`` aggregator
      (nvidia-physicsnemo-sym 2.4.0, ``physicsnemo/sym/loss/aggregator.py``).
      ``p`` is ``lmbda`` (init 0). Each update first shifts ``p`` by
      ``log K - logsumexp(p)`` (so ``sum exp(p) = K``) and uses ``w = exp(p)``;
      the gradient is taken with respect to the shifted ``p`` (not through a
      softmax), and the optimizer steps from the shifted value. ``L(0)`` are
      the losses of the first update, which already moves ``p``; alpha 1.
      PhysicsNeMo's shared layer is ``params[-2]`` of the model's parameter
      list; pass that leaf as ``layer``.
    * ``"paper"``: the weights themselves are trained (``w = p``, init 1), then
      clipped to ``min_weight`` and renormalised to sum to K, as in the
      paper's Algorithm 1; ``L(0)`` from the first update, which moves ``w``.
      Not checked against an original implementation (the authors released
      none); this was the library's behaviour before the conventions existed.

    The inner optimizer is not part of either original: LibMTL trains
    ``loss_scale`` with the Trainer's global optimizer (Adam, lr 1e-4, by
    default) and PhysicsNeMo with the trainer's optimizer as a second param
    group. ``weight_optimizer=None`` takes the optimizer of the recorded
    reference runs, so that the defaults reproduce them: ``optax.sgd(0.1)``
    for ``"libmtl"``, ``optax.adam(1e-2)`` for ``"physicsnemo"`` (torch's Adam
    and optax's agree), and ``optax.adam(0.025)`` for ``"paper"``. SGD's step
    scales with the gradient norms of W; if they are far from 1, pass an
    ``optax.adam`` whose step does not.

    Where the originals divide by zero (a zero initial loss, or a zero mean
    rate), the divisor is replaced by 1; a negative rate is clipped to 0 so
    that ``r**alpha`` stays real. Both originals give NaN there.

    Large gradients: the layer norms are computed row by row at a power-of-two
    scale (:func:`component_norms`), so they are finite wherever they are
    representable, and ``sum_k w_k g_k`` is formed at the scale of the largest
    entry, so it is finite wherever it is representable. The objective is
    homogeneous of degree 1 in the norms; where the largest norm reaches
    ``2**32`` (float32; ``2**256`` in float64) its gradient is taken on the
    norms scaled down by a power of two to below that bound, so that it and
    Adam's square of it stay finite. Below the bound nothing changes. Adam's
    weights are thus the same at every scale (up to its absolute ``eps``);
    SGD's step, which scales with the norms, is that of the norms at the
    bound. Guaranteed: finite weights and updates for finite losses and
    gradients whose layer norms are representable; an update with non-finite
    losses or norms leaves the state as it was and is counted in
    ``rejected``.

    Args:
      num_losses: K.
      layer: the shared layer W whose gradient norms are equalised, usually
        the last shared one: a function ``tree -> subtree`` (applied to the
        updates, which have the parameters' structure), a key path string
        such as ``"params/Dense_2/kernel"`` or ``"Dense_2"`` (all leaves
        below), or a tuple of keys.
      alpha: asymmetry; 0 equalises the norms, larger values push the slow
        components harder (the paper uses 0.12 to 3). ``None``: 1.5 for
        ``"libmtl"`` and ``"paper"``, 1 for ``"physicsnemo"`` (their defaults).
      weight_optimizer: optimizer of ``p``; ``None`` as described above.
      per_component: path (a) if True, path (b) if False (module docstring).
      min_weight: ``"paper"`` only (default 1e-3): the floor the weights are
        clipped to before renormalising, so a weight never turns negative.
      axis_name: pmap axis over which updates, losses and layer norms are
        averaged first, so every replica holds the same weights.
      convention: ``"libmtl"``, ``"physicsnemo"`` or ``"paper"``, keyword-only.
      initial_steps: ``"libmtl"`` only (default 1): the number of batches in
        LibMTL's first epoch, during which the weights stay 1 and whose mean
        losses become ``L(0)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
      ``updates, state, params=None, *, losses`` (``[K]``) and, with
      ``per_component=False``, ``layer_norms`` (``[K]``).

    Raises:
      ValueError: an argument out of range, an unknown ``convention``, or
        ``min_weight`` / ``initial_steps`` given to a convention without them.

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
    check_choice(convention, "convention", GRADNORM_CONVENTIONS)
    alpha = _DEFAULT_ALPHA[convention] if alpha is None else _check_float(alpha, "alpha", minimum=0.0)
    if min_weight is not None and convention != "paper":
        raise ValueError(
            f"`min_weight` applies to convention='paper' only (its weights can turn negative); "
            f"convention={convention!r} keeps them positive by construction. Got min_weight={min_weight!r}."
        )
    min_weight = _check_float(1e-3 if min_weight is None else min_weight, "min_weight", minimum=0.0)
    if min_weight >= 1:
        raise ValueError(
            f"`min_weight` must be < 1 so that weights summing to K can respect it; got {min_weight}."
        )
    if initial_steps is not None and convention != "libmtl":
        raise ValueError(
            f"`initial_steps` applies to convention='libmtl' only (its first epoch); "
            f"convention={convention!r} takes L(0) from the first update. "
            f"Got initial_steps={initial_steps!r}."
        )
    initial_steps = check_positive_int(1 if initial_steps is None else initial_steps, "initial_steps")
    if not isinstance(per_component, bool):
        raise ValueError(f"`per_component` must be a bool, got {per_component!r}.")
    opt = _DEFAULT_OPTIMIZER[convention]() if weight_optimizer is None else weight_optimizer
    step_kwargs = dict(
        optimizer=opt, alpha=alpha, convention=convention, initial_steps=initial_steps, min_weight=min_weight
    )

    def init_fn(params: Any) -> GradNormState:
        del params
        return gradnorm_init(k, opt, convention=convention)

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
        losses = _required_losses(losses, k, "gradnorm")
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
            updates = _combine(state.weights, updates)
        else:
            norms = check_vector(layer_norms, "layer_norms", k)
        new_state, _ = _gradnorm_step(state, losses, norms, **step_kwargs)
        # Non-finite losses or norms (a nan gradient) would make L(0) or the weights nan for
        # good: such an update leaves the state as it was and is counted in `rejected`.
        ok = jnp.all(jnp.isfinite(losses)) & jnp.all(jnp.isfinite(norms))
        return updates, _unless_rejected(ok, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gradnorm_init(
    num_losses: int, optimizer: optax.GradientTransformation, *, convention: str = "libmtl"
) -> GradNormState:
    """The initial :class:`GradNormState` (float64 under x64, else float32): weights 1, L(0) unset."""
    k = check_positive_int(num_losses, "num_losses")
    check_choice(convention, "convention", GRADNORM_CONVENTIONS)
    return learned_weights_state(
        GradNormState, jnp.full((k,), _INITIAL_PARAM[convention], jnp.result_type(float)), optimizer
    )


def learned_weights_state(cls: Any, param: jax.Array, optimizer: optax.GradientTransformation) -> Any:
    """A fresh state of a method whose weights are a trained parameter (GradNorm, ResNorm)."""
    return cls(
        weights=jnp.ones_like(param),
        param=param,
        initial_losses=jnp.zeros_like(param),
        count=jnp.zeros((), jnp.int32),
        inner_state=optimizer.init(param),
        rejected=jnp.zeros((), jnp.int32),
    )


def _required_losses(losses: Any, k: int, method: str) -> jax.Array:
    """The ``[K]`` losses an update of ``method`` received, or a ValueError saying how to pass them."""
    if losses is None:
        raise ValueError(
            f"{method} needs the current component losses: call `update(updates, state, params, "
            f"losses=losses)` with `losses` of shape ({k},)."
        )
    return check_vector(losses, "losses", k)


def _unless_rejected(ok: jax.Array, new_state: Any, state: Any) -> Any:
    """``new_state`` if ``ok``, else ``state`` with its ``rejected`` count one higher (GradNorm, ResNorm)."""
    skipped = state._replace(rejected=state.rejected + 1)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, skipped)


def weights_of(opt_state: Any, cls: Any) -> jax.Array:
    """The weights of the one ``cls`` state inside ``opt_state``, as a constant.

    Raises:
      ValueError: if ``opt_state`` holds no ``cls`` state, or several.
    """
    found = [
        n for n in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(n, cls)
    ]
    if len(found) != 1:
        raise ValueError(f"expected exactly one {cls.__name__} in `opt_state`, found {len(found)}.")
    return jax.lax.stop_gradient(found[0].weights)


def gradnorm_weights(opt_state: Any) -> jax.Array:
    """The weights ``[K]`` (summing to K) the GradNorm state in ``opt_state`` applies next.

    :func:`softadapt_jax.get_weights` reads it too (and any other weighting state).

    Raises:
      ValueError: if ``opt_state`` holds no :class:`GradNormState`, or several.
    """
    return weights_of(opt_state, GradNormState)


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

    Each component is scaled by its own power of two before squaring (the
    identity while its entries are below ``2**32`` in float32), so a norm is
    finite wherever it is representable.

    Args:
      stacked_grads: per-component gradients, leaves ``[K, ...]``.
      layer: as in :func:`gradnorm`.

    Raises:
      ValueError: the layer path does not exist or selects no array.
    """
    leaves = jax.tree.leaves(_select_layer(stacked_grads, layer))
    if not leaves:
        raise ValueError(f"`layer` {layer!r} selects no gradient leaf.")
    sizes = {jnp.shape(g)[0] if jnp.ndim(g) else None for g in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"the gradients of `layer` {layer!r} must be stacked on a common leading axis K; got shapes "
            f"{[tuple(jnp.shape(g)) for g in leaves]}."
        )
    # At least float32 (half-precision squares underflow), float64 kept under x64.
    dtype = jnp.result_type(*[jnp.promote_types(g.dtype, jnp.float32) for g in leaves])
    flat = [jnp.reshape(g, (g.shape[0], -1)).astype(dtype) for g in leaves if jnp.size(g)]
    if not flat:
        return jnp.zeros(leaves[0].shape[:1], dtype)
    # Each row is scaled by a power of two before squaring (exact, and the identity below
    # 2^(maxexp/4)), so the squares cannot overflow while the norm itself is representable.
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(f), axis=1) for f in flat]), axis=0)
    exponent = overflow_exponent(peak, dtype)
    down = power_of_two(-exponent, dtype)[:, None]
    sq = sum(jnp.sum((f * down) ** 2, axis=1) for f in flat)
    return jnp.sqrt(sq) * power_of_two(exponent, dtype)


def _select_layer(tree: Any, layer: Layer) -> Any:
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


def _combine(weights: jax.Array, updates: Any) -> Any:
    # sum_k w_k g_k over every leaf, formed at the scale of the largest entry so that it is
    # finite wherever the result is representable (per_component.combine_leaves).
    leaves, treedef = jax.tree.flatten(updates)
    dtype = jnp.result_type(*[jnp.promote_types(g.dtype, jnp.float32) for g in leaves])
    exponent = overflow_exponent(max_abs(leaves, dtype), dtype)
    return jax.tree.unflatten(treedef, combine_leaves(weights, leaves, exponent=exponent))


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
    """``mean(w n) * r_k^alpha``: GradNorm's target norms (a constant for the weight update).

    ``r_k = (L_k / L_k(0)) / mean_j(L_j / L_j(0))``, the relative inverse training rate. Where
    the mean ratio is not finite in floating point (a loss of 1e20 after an ``L(0)`` of 1e-38
    overflows), or is 0 although a loss is not (every ratio below the float range), ``r`` is
    taken in a scaled form instead (``_relative_rates``): it is at most K for non-negative
    losses, so representable whatever the ratios. Elsewhere it is the plain quotient.
    """
    l0 = jnp.where(initial_losses != 0, initial_losses, 1.0)
    ratio = losses / l0
    mean = jnp.mean(ratio)
    rel = ratio / jnp.where(mean != 0, mean, 1.0)
    plain = jnp.isfinite(mean) & ((mean != 0) | jnp.all(losses == 0))
    rel = jnp.where(plain, rel, _relative_rates(losses, l0))
    # A loss that went below zero has no meaningful rate; clamp so that r^alpha stays real.
    rel = jnp.maximum(rel, 0.0)
    g_avg = jnp.mean(weights * norms)
    return jax.lax.stop_gradient(g_avg * rel**alpha)


def _relative_rates(losses: jax.Array, l0: jax.Array) -> jax.Array:
    """``ratio / mean(ratio)`` with ``ratio = losses / l0``, formed without overflow.

    Each ratio is split into the quotient of the mantissas (``frexp``, in (1/4, 2)) times
    ``2^E_k``; every ratio is then scaled by ``2^-max(E)``, a power of two that the result does
    not depend on, so no sum or quotient overflows (ratios more than about ``2^149`` below the
    largest become 0, as their share of the mean rounds away).
    """
    ml, el = jnp.frexp(losses)
    m0, e0 = jnp.frexp(l0)
    q = ml / m0
    nonzero = q != 0
    exponent = el - e0
    top = jnp.max(jnp.where(nonzero, exponent, jnp.iinfo(exponent.dtype).min))
    scaled = jnp.where(nonzero, jnp.ldexp(q, jnp.where(nonzero, exponent - top, 0)), 0.0)
    mean = jnp.mean(scaled)
    return scaled / jnp.where(mean != 0, mean, 1.0)


def _weight_map(convention: str, k: int) -> Callable[[jax.Array], jax.Array]:
    """``p -> w`` of a convention (for "physicsnemo", ``p`` already shifted so that sum exp(p) = K)."""
    if convention == "libmtl":
        return lambda p: k * jax.nn.softmax(p)
    if convention == "physicsnemo":
        return jnp.exp
    return lambda p: p


def _prepare_param(param: jax.Array, convention: str) -> jax.Array:
    """PhysicsNeMo renormalises its lmbda in place at every call, before using it."""
    if convention == "physicsnemo":
        return param + (jnp.log(param.shape[0]) - jax.nn.logsumexp(param))
    return param


def _gradnorm_step(
    state: GradNormState,
    losses: jax.Array,
    norms: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    alpha: float,
    convention: str = "libmtl",
    initial_steps: int = 1,
    min_weight: float = 1e-3,
) -> tuple[GradNormState, GradNormInfo]:
    """One weight update of :func:`gradnorm` (arguments as there): ``(new_state, info)``.

    Args:
      state: the current state; ``state.count`` decides whether ``L(0)`` is
        still being recorded.
      losses: ``[K]`` current losses.
      norms: ``[K]`` unweighted gradient norms ``n_k`` on the shared layer.

    Returns:
      The state after the update (its ``weights`` apply to the next step) and
      the objective value and its gradient with respect to ``state.param``
      (after PhysicsNeMo's shift), zeros while ``"libmtl"`` holds the weights.
      Where the largest norm is ``2**(maxexp // 4)`` or more (``2**32`` in
      float32), the gradient is that of the norms scaled down by the power of
      two ``2**-e`` that brings the largest below that bound (``objective`` is
      still in the original units); see :func:`gradnorm`.
    """
    check_choice(convention, "convention", GRADNORM_CONVENTIONS)
    dtype = state.param.dtype
    k = state.param.shape[0]
    losses = jax.lax.stop_gradient(jnp.asarray(losses, dtype))
    norms = jax.lax.stop_gradient(jnp.asarray(norms, dtype))
    count = state.count
    # L(0) is the running mean of the first `n0` steps' losses (LibMTL: epoch 0; the others: step 0).
    n0 = initial_steps if convention == "libmtl" else 1
    recording = count < n0
    running = state.initial_losses + (losses - state.initial_losses) / (count + 1).astype(dtype)
    initial = jnp.where(recording, running, state.initial_losses)

    weight_map = _weight_map(convention, k)
    param = _prepare_param(state.param, convention)
    weights, pullback = jax.vjp(weight_map, param)
    # The objective is homogeneous of degree 1 in the norms. Norms of 2^(maxexp/4) or more are
    # scaled down by a power of two (exact; the identity below), so that its gradient, and Adam's
    # square of it, stay finite.
    exponent = overflow_exponent(jnp.max(norms), dtype)
    norms = norms * power_of_two(-exponent, dtype)
    targets = gradnorm_targets(weights, losses, norms, initial, alpha)
    residual = weights * norms - targets
    # d|x|/dx = sign(x), 0 at 0 as in torch; G_k = w_k n_k for w_k > 0.
    (grad,) = pullback(jnp.sign(residual) * norms)
    upd, inner = optimizer.update(grad, state.inner_state, param)
    new_param = optax.apply_updates(param, upd)
    if convention == "paper":
        new_param = jnp.maximum(new_param, min_weight)
        new_param = k * new_param / jnp.sum(new_param)
    info = GradNormInfo(objective=jnp.sum(jnp.abs(residual)) * power_of_two(exponent, dtype), grad=grad)

    if convention == "libmtl":
        # LibMTL's first epoch: plain sum (weights 1), loss_scale untouched.
        new_param, inner = jax.tree.map(
            lambda old, new: jnp.where(recording, old, new),
            (state.param, state.inner_state),
            (new_param, inner),
        )
        info = jax.tree.map(lambda x: jnp.where(recording, jnp.zeros_like(x), x), info)
        next_weights = jnp.where(count + 1 < n0, jnp.ones_like(param), weight_map(new_param))
    else:
        next_weights = weight_map(_prepare_param(new_param, convention))
    new_state = GradNormState(
        weights=next_weights.astype(dtype),
        param=new_param.astype(dtype),
        initial_losses=initial,
        count=count + 1,
        inner_state=inner,
        rejected=state.rejected,
    )
    return new_state, info
