"""ResNorm (residual normalisation), PhysicsNeMo-Sym's loss aggregator, as an optax transform.

ResNorm is GradNorm with the gradient norms replaced by the losses themselves:
it learns loss weights ``w = exp(lmbda)`` (renormalised to sum to K) so that
the weighted losses ``w_k L_k`` approach a common target that favours the
components whose loss fell least, relative to its initial value. It needs no
gradient statistic, so it costs one backward pass per step. The structure,
the state and the timing are those of :func:`softadapt_jax.gradients.gradnorm`
with ``convention="physicsnemo"``, whose helpers this module reuses.

Two ways to feed it, as for :func:`~softadapt_jax.gradients.gradnorm.gradnorm`:

(a) ``per_component=True`` (default): ``updates`` are the stacked per-component
    gradients ``[K, ...]`` and the transform returns ``sum_k w_k g_k``.
(b) ``per_component=False``: ``updates`` are already the gradient of
    ``sum_k w_k L_k`` (take ``w`` from :func:`resnorm_weights` of the optimizer
    state) and pass through unchanged. This is the cheap path: one VJP.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from softadapt_jax._checks import check_float, check_positive_int
from softadapt_jax.gradients.gradnorm import (
    _combine,
    _prepare_param,
    _required_losses,
    _unless_rejected,
    _weight_map,
    gradnorm_targets,
    learned_weights_state,
    weights_of,
)
from softadapt_jax.gradients.per_component import overflow_exponent, power_of_two


class ResNormState(NamedTuple):
    """State of :func:`resnorm`."""

    weights: jax.Array  # [K], sum K; exp of the renormalised lmbda, the weights the *next* update applies
    param: jax.Array  # [K], lmbda after the last optimizer step (before its renormalisation)
    initial_losses: jax.Array  # [K], L(0), the losses of the first accepted update
    count: jax.Array  # int32, number of accepted updates so far
    inner_state: optax.OptState  # the weight optimizer's state
    rejected: jax.Array  # int32, updates skipped for non-finite losses


class ResNormInfo(NamedTuple):
    """Diagnostics of one :func:`resnorm_step`."""

    objective: jax.Array  # scalar, sum_k |w_k L_k - target_k| (PhysicsNeMo's balancing term)
    grad: jax.Array  # [K], d objective / d lmbda (renormalised), what the weight optimizer received


def resnorm(
    *,
    num_losses: int,
    alpha: float = 1.0,
    weight_optimizer: optax.GradientTransformation | None = None,
    per_component: bool = True,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ResNorm: learn loss weights that equalise the weighted losses, relative to their decrease.

    With ``L(0)`` the losses of the first update and ``lmbda`` the trained
    parameter (init 0), one update computes::

        lmbda   <- lmbda + log K - logsumexp(lmbda)          (so that sum exp(lmbda) = K)
        w_k      = exp(lmbda_k)
        r_k      = (L_k / L_k(0)) / mean_j (L_j / L_j(0))     (relative inverse training rate)
        target_k = mean_j(L_j) * r_k**alpha                   (held constant; UNWEIGHTED mean)
        L_res    = sum_k | w_k L_k - target_k |               (L_k held constant)
        updates  = sum_k w_k g_k                              (w of this update)
        lmbda   <- lmbda + weight_optimizer(dL_res/dlmbda)    (acts from the next update on)

    so ``dL_res/dlmbda_k = sign(w_k L_k - target_k) w_k L_k``. The returned
    state's ``weights`` are those the next update applies (the renormalised
    ``exp(lmbda)``): as in PhysicsNeMo, step t's losses are multiplied by the
    weights after step t-1's optimizer step.

    Reproduces PhysicsNeMo-Sym's ``ResNorm`` aggregator (nvidia-physicsnemo-sym
    2.4.0, ``physicsnemo/sym/loss/aggregator.py``; contributors T. Nandi,
    D. Van Essendelft, M. A. Nabian), which returns
    ``L_res + sum_k w_k.detach() L_k`` and trains ``lmbda`` as a second param
    group of the trainer's optimizer; the target is the mean of the
    unweighted losses (GradNorm's is the mean of the weighted norms). Checked
    in float64 at ``rtol=1e-6`` (tests/test_parity_physicsnemo_resnorm.py).
    ResNorm has no paper of its own; it adapts GradNorm (Chen et al. 2018,
    arXiv:1711.02257).

    The inner optimizer stands for the trainer's: ``weight_optimizer=None`` is
    ``optax.adam(1e-2)``, the recorded reference run's (torch's Adam and
    optax's agree).

    Deliberate differences, where the original gives NaN: a zero initial loss
    or a zero mean rate divides by 1 instead, and a negative rate is clipped
    to 0 so that ``r**alpha`` stays real. Large losses: the objective is
    homogeneous of degree 1 in the losses, so where the largest loss reaches
    ``2**(maxexp // 4)`` (``2**32`` in float32) its gradient is taken on the
    losses scaled down by a power of two, which keeps it and Adam's square of
    it finite (the optimizer then sees the gradient of the scaled losses, so
    its steps differ from an infinite-precision run); below that bound nothing
    changes. An update with a non-finite loss leaves the state as it
    was and is counted in ``rejected``; its returned updates are the weighted
    combination of whatever came in (NaN in, NaN out, as any optax transform).

    Args:
      num_losses: K.
      alpha: asymmetry ``>= 0`` (PhysicsNeMo's default 1); 0 equalises the
        weighted losses.
      weight_optimizer: optimizer of ``lmbda``; ``None`` for ``optax.adam(1e-2)``.
      per_component: path (a) if True, path (b) if False (module docstring).
      axis_name: pmap axis over which updates and losses are averaged first,
        so every replica holds the same weights.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
      ``updates, state, params=None, *, losses`` (``[K]``).

    Raises:
      ValueError: ``num_losses`` not a positive integer, ``alpha`` negative or
        not finite, ``per_component`` not a bool; at trace time, ``losses``
        missing or not of shape ``[K]``, or stacked updates whose leading axis
        is not K.

    Example:
      >>> import optax
      >>> from softadapt_jax.gradients.resnorm import resnorm
      >>> tx = optax.chain(resnorm(num_losses=3), optax.adam(1e-3))
    """
    k = check_positive_int(num_losses, "num_losses")
    alpha = check_float(alpha, "alpha", low=0.0)
    if not isinstance(per_component, bool):
        raise ValueError(f"`per_component` must be a bool, got {per_component!r}.")
    opt = optax.adam(1e-2) if weight_optimizer is None else weight_optimizer

    def init_fn(params: Any) -> ResNormState:
        del params
        return resnorm_init(k, opt)

    def update_fn(
        updates: Any, state: ResNormState, params: Any = None, *, losses: Any = None, **extra_args: Any
    ) -> tuple[Any, ResNormState]:
        del extra_args, params
        losses = _required_losses(losses, k, "resnorm")
        if axis_name is not None:
            updates, losses = jax.lax.pmean((updates, losses), axis_name)
        if per_component:
            sizes = {jnp.shape(g)[0] if jnp.ndim(g) else None for g in jax.tree.leaves(updates)}
            if sizes != {k}:
                raise ValueError(
                    f"resnorm(num_losses={k}, per_component=True) needs updates stacked on a leading "
                    f"axis of size {k}; got leading sizes {sorted(map(str, sizes))}."
                )
            updates = _combine(state.weights, updates)
        new_state, _ = resnorm_step(state, losses, optimizer=opt, alpha=alpha)
        # A non-finite loss would poison L(0) or lmbda for good: the state is kept instead.
        return updates, _unless_rejected(jnp.all(jnp.isfinite(losses)), new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def resnorm_init(num_losses: int, optimizer: optax.GradientTransformation) -> ResNormState:
    """The initial :class:`ResNormState` (float64 under x64, else float32): lmbda 0, weights 1."""
    k = check_positive_int(num_losses, "num_losses")
    return learned_weights_state(ResNormState, jnp.zeros((k,), jnp.result_type(float)), optimizer)


def resnorm_weights(opt_state: Any) -> jax.Array:
    """The weights ``[K]`` (summing to K) the ResNorm state in ``opt_state`` applies next.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`ResNormState`, or several.
    """
    return weights_of(opt_state, ResNormState)


def resnorm_targets(losses: jax.Array, initial_losses: jax.Array, alpha: float) -> jax.Array:
    """``mean(L) * r_k^alpha``: ResNorm's targets, the unweighted mean loss times the rate ``[K]``."""
    losses = jnp.asarray(losses)
    # GradNorm's target with unit weights and the losses in place of the norms.
    return gradnorm_targets(jnp.ones_like(losses), losses, losses, initial_losses, alpha)


def resnorm_step(
    state: ResNormState, losses: jax.Array, *, optimizer: optax.GradientTransformation, alpha: float
) -> tuple[ResNormState, ResNormInfo]:
    """One weight update of :func:`resnorm` (arguments as there): ``(new_state, info)``.

    ``info.objective`` is PhysicsNeMo's balancing term (the aggregated loss
    minus ``sum_k w_k L_k``) and ``info.grad`` its gradient with respect to the
    renormalised ``lmbda``, both at this update's weights ``state.weights``. Where the
    largest loss is ``2**(maxexp // 4)`` or more, ``info.grad`` is that of the losses scaled
    down by a power of two (what the optimizer received); ``objective`` stays in the
    original units.
    """
    dtype = state.param.dtype
    k = state.param.shape[0]
    losses = jax.lax.stop_gradient(jnp.asarray(losses, dtype))
    # L(0) is taken at the first update (PhysicsNeMo: step == 0).
    initial = jnp.where(state.count == 0, losses, state.initial_losses)

    weight_map = _weight_map("physicsnemo", k)
    param = _prepare_param(state.param, "physicsnemo")
    weights, pullback = jax.vjp(weight_map, param)
    # Homogeneous of degree 1 in the losses (r is scale free): a power-of-two scale-down of
    # huge losses is exact and keeps the gradient, and Adam's square of it, finite.
    exponent = overflow_exponent(jnp.max(jnp.abs(losses)), dtype)
    scaled = losses * power_of_two(-exponent, dtype)
    targets = gradnorm_targets(jnp.ones_like(scaled), losses, scaled, initial, alpha)
    residual = weights * scaled - targets
    # d|x|/dx = sign(x), 0 at 0 as in torch.
    (grad,) = pullback(jnp.sign(residual) * scaled)
    upd, inner = optimizer.update(grad, state.inner_state, param)
    new_param = optax.apply_updates(param, upd)
    info = ResNormInfo(objective=jnp.sum(jnp.abs(residual)) * power_of_two(exponent, dtype), grad=grad)
    new_state = ResNormState(
        weights=weight_map(_prepare_param(new_param, "physicsnemo")).astype(dtype),
        param=new_param.astype(dtype),
        initial_losses=initial,
        count=state.count + 1,
        inner_state=inner,
        rejected=state.rejected,
    )
    return new_state, info
