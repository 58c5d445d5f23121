"""Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla 2018)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from softadapt_jax import _checks
from softadapt_jax.balancers.base import Balancer, make_balancer, resolve_dtype

# form -> (a, b) of the total loss sum_k a * exp(-s_k) * L_k + b * s_k.
UNCERTAINTY_FORMS: dict[str, tuple[float, float]] = {
    "simple": (1.0, 1.0),
    "regression": (0.5, 0.5),
    "classification": (1.0, 0.5),
}


def uncertainty_balancer(
    *,
    num_losses: int,
    form: str = "simple",
    optimizer: optax.GradientTransformation | None = None,
    update_every: int = 1,
    accumulate: int = 1,
    setpoint: Any = None,
    dtype: Any = None,
) -> Balancer:
    """Learned log-variances ``s_k``: weights ``a * exp(-s_k)``.

    Kendall et al. minimise ``sum_k a * exp(-s_k) * L_k + b * s_k`` jointly over
    the model and ``s_k = log sigma_k^2``. The ``b * s_k`` term does not depend
    on the model, so the model's gradient is ``sum_k w_k grad L_k`` with
    ``w_k = a * exp(-s_k)``: a balancer. ``s`` is updated here by its own
    optax ``optimizer`` with the closed-form gradient::

        d/ds_k = b - a * exp(-s_k) * L_k

    using the newest history entry ``L`` (the loss of the step just taken, at
    the weights used for it), and the new weights ``a * exp(-s_k)`` are used at
    the next step: the same sequence as joint training with a separate
    optimizer for ``s``. The stationary point is ``exp(s_k) = a L_k / b``,
    i.e. ``w_k = b / L_k``. ``form`` picks ``(a, b)``:

    * ``"simple"`` (default): ``exp(-s) L + s``, ``(a, b) = (1, 1)``; the form
      most reimplementations use; weights tend to ``1 / L_k``.
    * ``"regression"``: Kendall's Gaussian likelihood ``L / (2 sigma^2) +
      log sigma`` = ``(exp(-s) L + s) / 2``, ``(a, b) = (1/2, 1/2)``; same
      stationary point, half the gradient; weights tend to ``1 / (2 L_k)``.
    * ``"classification"``: Kendall's softmax approximation ``L / sigma^2 +
      log sigma`` = ``exp(-s) L + s / 2``, ``(a, b) = (1, 1/2)``; weights tend
      to ``1 / (2 L_k)``.

    The weights do not sum to a constant. ``weights_sum`` is ``a * K``, the sum
    at the initial ``s = 0`` (weights ``a`` each, 1 for ``"simple"``), which is
    also the scale of the warm-up. ``s`` is clipped to ``+-log(max float) / 2``
    (about 44 in float32) so the weights stay finite even when a loss reaches 0
    (the gradient is clipped to finite values too, and an update giving nan
    keeps the previous ``s``).

    ``method_state`` is ``{"log_vars": s [K], "opt_state": optimizer state}``;
    with ``update_every``/``accumulate`` the optimizer takes one step per
    recompute, with the newest (accumulated) entry.

    Reference: A. Kendall, Y. Gal and R. Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018
    (arXiv:1705.07115), Eqs. (7) and (10).

    Args:
      num_losses: K, the number of loss components.
      form: ``"simple"``, ``"regression"`` or ``"classification"`` (above).
      optimizer: the optax transformation updating ``s``; default
        ``optax.adam(1e-2)``.
      update_every: recompute (one optimizer step) every n steps.
      accumulate: average the losses of n steps into one history entry.
      setpoint: optional ``[K]`` non-negative coefficients multiplying the weights.
      dtype: history dtype, also that of ``s`` (float32 by default; float64
        under x64).

    Returns:
      A :class:`~softadapt_jax.balancers.base.Balancer` with
      ``weights_sum = a * K`` (the sum at initialisation only).

    Raises:
      ValueError: unknown ``form``; invalid ``num_losses``, ``update_every``,
        ``accumulate``, ``setpoint`` or ``dtype``.
      TypeError: ``optimizer`` is not an ``optax.GradientTransformation``.
    """
    k = _checks.check_positive_int(num_losses, "num_losses")
    _checks.check_choice(form, "form", UNCERTAINTY_FORMS)
    a, b = UNCERTAINTY_FORMS[form]
    if optimizer is None:
        optimizer = optax.adam(1e-2)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )
    hist_dtype = resolve_dtype(dtype)

    def rule(history: jax.Array, initial: jax.Array, method_state: Any) -> tuple[jax.Array, Any]:
        del initial
        losses = history[-1]
        s = method_state["log_vars"]
        big = float(jnp.finfo(s.dtype).max)
        grad = jnp.clip(b - a * jnp.exp(-s) * losses, -big, big)  # huge losses: no inf
        updates, opt_state = optimizer.update(grad, method_state["opt_state"], s)
        bound = 0.5 * math.log(big)  # exp(+-bound) is finite
        new_s = jnp.clip(optax.apply_updates(s, updates), -bound, bound).astype(s.dtype)
        new_s = jnp.where(jnp.isnan(new_s), s, new_s)
        return a * jnp.exp(-new_s), {"log_vars": new_s, "opt_state": opt_state}

    s0 = jnp.zeros((k,), hist_dtype)
    init_method_state = {"log_vars": s0, "opt_state": optimizer.init(s0)}
    return make_balancer(
        rule,
        num_losses=k,
        window=1,
        weights_sum=a * k,
        init_method_state=init_method_state,
        update_every=update_every,
        accumulate=accumulate,
        setpoint=setpoint,
        dtype=hist_dtype,
        name=f"uncertainty_{form}",
    )
