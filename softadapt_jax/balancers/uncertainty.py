"""Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla 2018)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, _options, make_balancer

# form -> (a, b) of the total loss sum_k a * exp(-s_k) * L_k + b * s_k.
UNCERTAINTY_FORMS: dict[str, tuple[float, float]] = {
    "simple": (1.0, 1.0),
    "regression": (0.5, 0.5),
    "classification": (1.0, 0.5),
}

# convention -> (form, initial log-variance, optimizer of the log-variances).
UNCERTAINTY_CONVENTIONS: dict[str, tuple[str, float, Callable[[], optax.GradientTransformation]]] = {
    # LibMTL UW: loss_scale initialised to -0.5; the recorded runs step it with SGD(lr=0.1).
    "libmtl": ("regression", -0.5, lambda: optax.sgd(0.1)),
    # PhysicsNeMo-Sym HomoscedasticUncertainty: log_var initialised to 0, in the
    # trainer's Adam (lr 1e-2 in the recorded runs) as a second parameter group.
    "physicsnemo": ("regression", 0.0, lambda: optax.adam(1e-2)),
}


def _form(form: str) -> tuple[float, float]:
    _checks.check_choice(form, "form", UNCERTAINTY_FORMS)
    return UNCERTAINTY_FORMS[form]


def uncertainty_weights(log_vars: jax.Array, form: str = "regression") -> jax.Array:
    """The loss coefficients ``a * exp(-s_k)`` of the log-variances ``s [G]``."""
    a, _ = _form(form)
    return a * jnp.exp(-log_vars)


def uncertainty_log_var_grad(log_vars: jax.Array, losses: jax.Array, form: str = "regression") -> jax.Array:
    """``d/ds_k`` of ``sum_k a exp(-s_k) L_k + b s_k``: ``b - a exp(-s_k) L_k``.

    Clipped to the largest finite float, so that a huge loss gives a finite
    gradient.
    """
    a, b = _form(form)
    big = float(jnp.finfo(log_vars.dtype).max)
    return jnp.clip(b - a * jnp.exp(-log_vars) * losses, -big, big)


def uncertainty_balancer(
    *,
    num_losses: int,
    form: str | None = None,
    optimizer: optax.GradientTransformation | None = None,
    convention: str = "libmtl",
    init_log_var: float | None = None,
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    dtype: Any = None,
    groups: Sequence[int] | None = None,
) -> Balancer:
    """Learned log-variances ``s_k``: weights ``a * exp(-s_k)``.

    Kendall et al. minimise ``sum_k a * exp(-s_k) * L_k + b * s_k`` jointly over
    the model and ``s_k = log sigma_k^2``. The ``b * s_k`` term does not depend
    on the model, so the model's gradient is ``sum_k w_k grad L_k`` with
    ``w_k = a * exp(-s_k)``: a balancer. ``s`` is updated here by its own
    optax ``optimizer`` with the closed-form gradient
    (:func:`uncertainty_log_var_grad`)::

        d/ds_k = b - a * exp(-s_k) * L_k

    Timing: the log-variances ``s(t)`` give the weights of step t; the update
    after step t uses that step's loss ``L(t)`` (the newest history entry) and
    ``s(t)``, and gives ``s(t+1)``, whose weights are returned for step t+1.
    That is the order of joint training (forward with ``s(t)``, backward,
    optimizer step), as in both references below. The stationary point is
    ``exp(s_k) = a L_k / b``, i.e. ``w_k = b / L_k``.

    ``convention`` sets the defaults of ``form``, ``init_log_var`` and
    ``optimizer`` (each can be overridden):

    * ``"libmtl"`` (default): LibMTL's UW (``LibMTL/weighting/UW.py``, git
      4336804), loss ``sum_k L_k / (2 exp(s_k)) + s_k / 2`` (form
      ``"regression"``), ``s`` initialised to -0.5 (weights ``exp(0.5) / 2``),
      stepped by ``optax.sgd(0.1)``: the optimizer of LibMTL's recorded
      reference runs. (LibMTL's Trainer would step ``s`` with its global
      optimizer, Adam lr 1e-4 by default: ``optimizer=optax.adam(1e-4)``.)
    * ``"physicsnemo"``: PhysicsNeMo-Sym's ``HomoscedasticUncertainty``
      (``physicsnemo/sym/loss/aggregator.py``, 2.4.0), loss
      ``(sum_k exp(-s_k) L_k + sum_k s_k) / 2``, the same form, ``s``
      initialised to 0 (weights 1/2), stepped by ``optax.adam(1e-2)``, the
      Adam of its trainer with the recorded runs' learning rate. (Its static
      per-loss ``weights`` multiply the losses *inside* the uncertainty term;
      ``setpoint`` here multiplies the weights only.)

    ``form`` picks ``(a, b)``:

    * ``"regression"``: Kendall's Gaussian likelihood ``L / (2 sigma^2) +
      log sigma`` = ``(exp(-s) L + s) / 2``, ``(a, b) = (1/2, 1/2)``; weights
      tend to ``1 / (2 L_k)``.
    * ``"simple"``: ``exp(-s) L + s``, ``(a, b) = (1, 1)``; the same
      stationary ``s`` with twice the gradient; weights tend to ``1 / L_k``.
    * ``"classification"``: Kendall's softmax approximation ``L / sigma^2 +
      log sigma`` = ``exp(-s) L + s / 2``, ``(a, b) = (1, 1/2)``; weights tend
      to ``1 / (2 L_k)``.

    The weights do not sum to a constant. ``weights_sum`` is
    ``G * a * exp(-init_log_var)``, the sum at initialisation, which is also the
    scale of the warm-up (until the first history entry with ``accumulate``).
    ``s`` is clipped to ``+-log(max float) / 2`` (about 44 in float32) so the
    weights stay finite even when a loss reaches 0 (the gradient is clipped to
    finite values too, and an update that would make ``s`` or the optimizer's
    state non-finite, such as Adam's second moment after one extreme loss, is
    dropped: ``s`` and the optimizer state stay as they were).

    ``method_state`` is ``{"log_vars": s [G], "opt_state": optimizer state}``;
    with ``update_every``/``accumulate`` the optimizer takes one step per
    recompute, with the newest (accumulated) entry.

    Reference: A. Kendall, Y. Gal and R. Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018
    (arXiv:1705.07115), Eqs. (7) and (10).

    Args:
      num_losses: K, the number of loss components.
      form: ``"regression"``, ``"simple"`` or ``"classification"`` (above);
        default the convention's (``"regression"`` for both).
      optimizer: the optax transformation updating ``s``; default the
        convention's (``optax.sgd(0.1)`` for ``"libmtl"``, ``optax.adam(1e-2)``
        for ``"physicsnemo"``).
      convention: ``"libmtl"`` or ``"physicsnemo"`` (above).
      init_log_var: the initial value of every ``s_k``, a float within the
        clipping bound; default the convention's (-0.5 for ``"libmtl"``, 0 for
        ``"physicsnemo"``).
      update_every: recompute (one optimizer step) every n steps.
      accumulate: average the losses of n steps into one history entry.
      setpoint: optional ``[K]`` non-negative coefficients multiplying the weights.
      dtype: history dtype, also that of ``s`` (float32 by default; float64
        under x64).
      groups: optional length-K group ids (see
        :func:`~softadapt_jax.balancers.base.make_balancer`): one log-variance
        per group, driven by the group's summed loss.

    Returns:
      A :class:`~softadapt_jax.balancers.base.Balancer` with
      ``weights_sum = G * a * exp(-init_log_var)`` (the sum at initialisation only).

    Raises:
      ValueError: unknown ``form`` or ``convention``, ``init_log_var`` not
        finite or beyond the clipping bound; invalid ``num_losses``,
        ``update_every``, ``accumulate``, ``setpoint``, ``dtype`` or ``groups``.
      TypeError: ``optimizer`` is not an ``optax.GradientTransformation``.
    """
    options = _options(num_losses, update_every, accumulate, setpoint, dtype, groups)
    g, hist_dtype = options.num_groups, options.dtype
    _checks.check_choice(convention, "convention", UNCERTAINTY_CONVENTIONS)
    default_form, default_s0, default_optimizer = UNCERTAINTY_CONVENTIONS[convention]
    form = default_form if form is None else form
    a, _ = _form(form)
    bound = 0.5 * math.log(float(jnp.finfo(hist_dtype).max))  # exp(+-bound) is finite
    if init_log_var is None:
        s0 = default_s0
    else:
        s0 = _checks.check_float(init_log_var, "init_log_var", low=-bound, high=bound)
    if optimizer is None:
        optimizer = default_optimizer()
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )

    def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
        del initial
        s = method_state["log_vars"]
        grad = uncertainty_log_var_grad(s, history[-1], form)
        updates, opt_state = optimizer.update(grad, method_state["opt_state"], s)
        new_s = jnp.clip(optax.apply_updates(s, updates), -bound, bound).astype(s.dtype)
        # One extreme finite loss can overflow the optimizer's own state (Adam's second
        # moment squares the gradient): such an update is dropped whole, s and optimizer
        # state alike, instead of freezing that weight for good.
        ok = _checks.all_finite(new_s, opt_state)
        new_s, opt_state = jax.tree.map(
            lambda new, old: jnp.where(ok, new, old), (new_s, opt_state), (s, method_state["opt_state"])
        )
        return uncertainty_weights(new_s, form), {"log_vars": new_s, "opt_state": opt_state}

    s_init = jnp.full((g,), s0, hist_dtype)
    init_method_state = {"log_vars": s_init, "opt_state": optimizer.init(s_init)}
    return make_balancer(
        rule,
        **options._asdict(),
        window=1,
        weights_sum=g * a * math.exp(-s0),
        name=f"uncertainty_{form}",
        init_method_state=init_method_state,
    )
