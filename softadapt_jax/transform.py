"""Balancers as optax transforms, the one-backward-pass gradient helper, and weight read-out.

A balancer's state lives in the optimizer state, so a training run stays pure,
jittable and checkpointable. The transform takes the current component losses
as the keyword-only extra argument ``losses`` and forms the update in one of
two ways:

(a) ``per_component=True``: ``updates`` are the K per-component gradients
    stacked on a leading axis; the transform returns ``sum_k w_k g_k``.
(b) ``per_component=False`` (default): ``updates`` are already the gradient of
    ``sum_k w_k L_k``, computed with one backward pass by
    :func:`value_and_weighted_grad` using :func:`get_weights` of the optimizer
    state; the transform passes them through and only records the losses.

In both paths the weights applied at a step are the ones held in the state
*before* that step's losses are recorded, so (a) and (b) give the same
parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from softadapt_jax.balancers.base import Balancer, BalancerState
from softadapt_jax.balancers.softadapt import softadapt_balancer
from softadapt_jax.weights import REFERENCE_EPS, Variant

# Arguments of :func:`softadapt` that must stay Python values under
# ``optax.inject_hyperparams``, which turns every int and float argument into an
# array; bools, strings and ``**options`` stay static by themselves.
SOFTADAPT_STATIC_ARGS: tuple[str, ...] = (
    "num_losses",
    "window",
    "accuracy_order",
    "update_every",
    "accumulate",
    "eps",
)


def _check_update_shapes(updates: Any, params: Any, num_losses: int, per_component: bool) -> None:
    """Trace-time shape contract between ``updates`` and ``params`` (stacked or not)."""
    if params is None:
        if per_component:
            raise ValueError(
                "per_component=True needs `params`: only their shapes tell stacked per-component "
                f"gradients [K={num_losses}, ...] from plain ones. Call "
                "`tx.update(updates, state, params, losses=losses)`."
            )
        return
    u_leaves, u_def = jax.tree.flatten(updates)
    p_leaves, p_def = jax.tree.flatten(params)
    if u_def != p_def:
        raise ValueError(
            f"`updates` and `params` must have the same tree structure, got {u_def} and {p_def}."
        )
    for i, (g, p) in enumerate(zip(u_leaves, p_leaves, strict=True)):
        g_shape, p_shape = tuple(jnp.shape(g)), tuple(jnp.shape(p))
        expected = (num_losses, *p_shape) if per_component else p_shape
        if g_shape == expected:
            continue
        hint = ""
        if not per_component and g_shape == (num_losses, *p_shape):
            hint = " It looks stacked per component: build the transform with per_component=True."
        elif per_component and g_shape == p_shape:
            hint = " It looks like a plain gradient: build the transform with per_component=False."
        layout = f"stacked [K={num_losses}, ...] per-component gradients" if per_component else "gradients"
        raise ValueError(
            f"`updates` leaf {i} has shape {g_shape}, but {layout} of a parameter of shape {p_shape} "
            f"have shape {expected}.{hint}"
        )


def _combine(weights: jax.Array, updates: Any) -> Any:
    return jax.tree.map(lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), updates)


def balance(balancer: Balancer, *, per_component: bool = False) -> optax.GradientTransformationExtraArgs:
    """An optax transform that keeps ``balancer``'s state and applies its weights.

    Args:
      balancer: any :class:`~softadapt_jax.balancers.base.Balancer`.
      per_component: if True, ``updates`` are per-component gradients stacked
        on a leading axis of size K and are combined with the current weights;
        if False they are passed through (path (b), see the module docstring).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
      ``updates, state, params=None, *, losses, statistics=None``
      (``losses``: ``[K]``; ``statistics``: the gradient statistic of
      balancers that declare one, needed when ``state.recompute_next``).

    Example:
      >>> import optax
      >>> from softadapt_jax import balance, softadapt_balancer
      >>> tx = optax.chain(balance(softadapt_balancer(num_losses=3)), optax.adam(1e-3))
    """
    if not isinstance(per_component, bool):
        raise TypeError(f"`per_component` must be a bool, got {per_component!r}.")
    k = balancer.num_losses

    def init_fn(params: Any) -> BalancerState:
        del params
        return balancer.init()

    def update_fn(
        updates: Any,
        state: BalancerState,
        params: Any = None,
        *,
        losses: Any = None,
        statistics: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, BalancerState]:
        del extra_args
        if losses is None:
            raise ValueError(
                f"The {balancer.name} transform needs the current component losses: call "
                f"`update(updates, state, params, losses=losses)` with `losses` of shape ({k},)."
            )
        _check_update_shapes(updates, params, k, per_component)
        weights = state.weights
        if per_component:
            updates = _combine(weights, updates)
        _, state = balancer.update(losses, state, statistics)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def softadapt(
    beta: Any = 0.1,
    *,
    num_losses: int,
    variant: Variant = "loss_weighted",
    window: int = 5,
    accuracy_order: int | None = None,
    update_every: int = 1,
    accumulate: int = 1,
    per_component: bool = False,
    setpoint: Any = None,
    stencil: str = "forward",
    scale: str = "none",
    relative_to: str = "initial",
    normalization: str = "sum",
    sum_to_k: bool = False,
    eps: float = REFERENCE_EPS,
    dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """SoftAdapt (Heydari et al. 2019, arXiv:1912.12355) as an optax transform.

    The state holds a window of the last ``window`` loss entries; the weights
    ``w = softadapt_weights(history, beta, variant=...)`` are recomputed every
    ``update_every`` steps once the window is full, and are uniform before
    (``1/K``, or 1 with ``sum_to_k=True``), so there is no jump when adaptation
    starts. Non-finite losses are rejected (state unchanged but for the
    ``rejected`` counter).

    Args:
      beta: temperature; > 0 favours the slowest-decreasing loss. A float or
        array; schedule it with ``optax.inject_hyperparams(softadapt,
        static_args=SOFTADAPT_STATIC_ARGS)``.
      num_losses: K, the number of loss components.
      variant: ``"loss_weighted"`` (default: the variant the original's
        README recommends for training), ``"original"`` or ``"normalized"``.
        The pure :func:`~softadapt_jax.softadapt_weights` defaults to
        ``"original"`` instead, the plain formula of the paper.
      window: history length T (>= 2).
      accuracy_order: finite-difference order, ``None`` = ``window - 1``.
      update_every: recompute the weights every n steps.
      accumulate: average n steps of losses into one history entry.
      per_component: path (a) if True, path (b) if False (module docstring).
      setpoint: optional ``[K]`` prior coefficients multiplying the weights.
      stencil, scale, relative_to, normalization, sum_to_k, eps, dtype: as in
        :func:`softadapt_balancer` and :class:`SoftAdaptOptions`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its update takes the
      keyword-only extra argument ``losses`` (shape ``[K]``).

    Example (path (b), one backward pass per step):
      >>> import jax, jax.numpy as jnp, optax
      >>> import softadapt_jax as sj
      >>> def loss_components(p):
      ...     return jnp.stack([jnp.sum(p ** 2), jnp.sum((p - 1) ** 2), jnp.sum(jnp.abs(p))])
      >>> tx = optax.chain(sj.softadapt(0.1, num_losses=3), optax.adam(1e-2))
      >>> params = jnp.ones(4); opt_state = tx.init(params)
      >>> @jax.jit
      ... def step(params, opt_state):
      ...     w = sj.get_weights(opt_state)
      ...     (total, losses), grads = sj.value_and_weighted_grad(loss_components)(w, params)
      ...     updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
      ...     return optax.apply_updates(params, updates), opt_state
      >>> params, opt_state = step(params, opt_state)
    """
    # Every argument but per_component is softadapt_balancer's, under the same name: the shortcut
    # passes them on as given (locals() holds only the arguments here, as the body's first line).
    arguments = {name: value for name, value in locals().items() if name != "per_component"}
    return balance(softadapt_balancer(**arguments), per_component=per_component)


def find_balancer_states(opt_state: Any) -> list[BalancerState]:
    """All :class:`BalancerState` found in an optimizer state, in tree order."""
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, BalancerState))
    return [n for n in nodes if isinstance(n, BalancerState)]


def _weighting_state_types() -> tuple[type, ...]:
    # Imported here: the gradient-level methods import this module's helpers.
    from softadapt_jax.gradients.gradnorm import GradNormState
    from softadapt_jax.gradients.resnorm import ResNormState

    return (BalancerState, GradNormState, ResNormState)


def get_weights(opt_state: Any) -> jax.Array:
    """The current weights ``[K]`` of the one weighting method inside an optimizer state.

    Reads any weighting state the library keeps: a balancer's
    (:class:`BalancerState`), GradNorm's and ResNorm's. Works through
    ``optax.chain``, ``optax.named_chain``, ``optax.inject_hyperparams``,
    ``optax.MultiSteps`` and any other wrapper that keeps inner states as
    pytree children.

    Args:
      opt_state: an optimizer state containing exactly one weighting state.

    Returns:
      The weights ``[K]`` to apply at the next step (a constant: no gradient
      flows through them).

    Raises:
      ValueError: if there is no weighting state, or more than one.
    """
    types = _weighting_state_types()
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, types))
    states = [n for n in nodes if isinstance(n, types)]
    if len(states) != 1:
        names = sorted({type(n).__name__ for n in states}) or "none"
        raise ValueError(
            "get_weights expects exactly one weighting state (BalancerState, GradNormState or "
            f"ResNormState) in `opt_state`, found {len(states)} ({names})."
        )
    return jax.lax.stop_gradient(states[0].weights)


def check_losses_match_weights(losses: jax.Array, weights: Any) -> jax.Array:
    """The weights as a constant in the losses' dtype, after checking losses is ``[K]`` like them.

    Raises:
      ValueError: (at trace time) ``losses`` is not a vector of the weights' shape.
    """
    w = jax.lax.stop_gradient(jnp.asarray(weights))
    if jnp.ndim(losses) != 1 or w.shape != jnp.shape(losses):
        raise ValueError(
            f"loss_components_fn must return a loss vector [K] matching `weights` of shape "
            f"{tuple(w.shape)}; got losses of shape {tuple(jnp.shape(losses))}."
        )
    return w.astype(losses.dtype)


def value_and_weighted_grad(
    loss_components_fn: Callable[..., Any], argnums: int = 0, has_aux: bool = False
) -> Callable[..., tuple[tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, Any], Any]]:
    """The gradient of ``sum_k w_k L_k`` in one backward pass (a VJP with ``w`` as cotangent).

    Args:
      loss_components_fn: ``f(*args) -> losses [K]`` (or ``(losses, aux)`` with
        ``has_aux``).
      argnums: which positional argument of ``f`` to differentiate.
      has_aux: whether ``f`` returns ``(losses, aux)``.

    Returns:
      ``g(weights, *args) -> ((total, losses), grads)`` or
      ``((total, losses, aux), grads)`` with ``has_aux``. ``weights`` (``[K]``)
      are treated as constants; ``total = sum_k w_k L_k``.

    Raises:
      ValueError: if ``f`` does not return a vector of shape ``[K]`` matching
        ``weights``.
    """

    def wrapped(weights: Any, *args: Any) -> Any:
        if not 0 <= argnums < len(args):
            raise ValueError(f"`argnums`={argnums} but only {len(args)} positional argument(s) given.")

        def f(x: Any) -> Any:
            return loss_components_fn(*args[:argnums], x, *args[argnums + 1 :])

        out = jax.vjp(f, args[argnums], has_aux=has_aux)
        losses, vjp_fn = out[0], out[1]
        w = check_losses_match_weights(losses, weights)
        (grads,) = vjp_fn(w)
        total = jnp.vdot(w, losses)
        if has_aux:
            return (total, losses, out[2]), grads
        return (total, losses), grads

    return wrapped
