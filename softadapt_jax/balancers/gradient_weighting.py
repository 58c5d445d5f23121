"""Gradient-statistics weightings PINN codes ship: learning-rate annealing, gradient norm, NTK.

All three recompute their weights every ``update_every`` steps from a
statistic of the per-component gradients (:mod:`softadapt_jax.statistics`)
and smooth them with a moving average. The state's ``recompute_next`` says
when the statistic is due, and :func:`softadapt_jax.training.make_train_step`
computes it only then, so all other steps cost one backward pass.

Weights start at 1 each (plain summation) and do not sum to a constant.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softadapt_jax import _checks
from softadapt_jax import statistics as _statistics
from softadapt_jax.balancers.base import STATISTIC_AT as STATISTIC_AT  # the choices of `statistic_at`
from softadapt_jax.balancers.base import Balancer, _Options, _options, make_balancer

LR_ANNEALING_MODES: tuple[str, ...] = ("max", "mean")
LR_ANNEALING_CONVENTIONS: tuple[str, ...] = ("wang2021", "physicsnemo")
NTK_CONVENTIONS: tuple[str, ...] = ("jaxpi", "physicsnemo")


class GradientWeightingState(NamedTuple):
    """Method state of the gradient-statistics balancers (G = number of weight groups).

    The statistic each method needs, its options and where it is evaluated
    are static settings of the :class:`~softadapt_jax.balancers.Balancer`,
    which the train step receives (``make_train_step(..., balancer=...)``).
    """

    ema: jax.Array  # [G] float, moving average of the weights (before any set-point)


EstimateFn = Callable[[jax.Array, jax.Array], jax.Array]


def _ema_rule(estimate_fn: EstimateFn, keep: float, new: float, fixed: int | None) -> Any:
    """A weight rule: ``ema = keep * ema + new * estimate(statistic, ema)``.

    Where the estimate is not finite (a zero gradient in a denominator), the
    previous average is kept for that component. ``fixed``: a component whose
    weight stays exactly 1.
    """

    def rule(history: jax.Array, initial: jax.Array, ms: GradientWeightingState, stats: jax.Array):
        del history, initial
        est = estimate_fn(stats.astype(ms.ema.dtype), ms.ema)
        est = jnp.where(jnp.isfinite(est), est, ms.ema)
        ema = keep * ms.ema + new * est
        if fixed is not None:
            ema = ema.at[fixed].set(1.0)
        return ema, ms._replace(ema=ema)

    return rule


def _make(
    name: str,
    statistic: str,
    rule: Any,
    options: _Options,
    *,
    update_first: bool,
    statistic_at: str,
    statistic_options: tuple[tuple[str, Any], ...],
) -> Balancer:
    """The balancer of a moving-average rule on a gradient statistic: window 1, weights starting at 1."""
    ema = jnp.ones((options.num_groups,), options.dtype)
    return make_balancer(
        rule,
        **options._asdict(),
        window=1,
        weights_sum=float(options.num_groups),
        name=name,
        init_method_state=GradientWeightingState(ema=ema),
        statistic=statistic,
        update_first=update_first,
        statistic_options=statistic_options,
        statistic_at=statistic_at,
    )


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _check_momentum(momentum: Any) -> float:
    return _checks.check_float(momentum, "momentum", low=0.0, high=1.0)


def lr_annealing_balancer(
    *,
    num_losses: int,
    alpha: float | None = None,
    mode: str | None = None,
    reference: int = 0,
    update_every: int | None = None,
    convention: str = "wang2021",
    eps: float | None = None,
    params_filter: _statistics.ParamsFilter | None = None,
    update_first: bool | None = None,
    statistic_at: str | None = None,
    groups: Sequence[int] | None = None,
    setpoint: Any = None,
    dtype: Any = None,
) -> Balancer:
    """Learning-rate annealing (Wang, Teng & Perdikaris 2021, arXiv:2001.04536).

    Default ``convention="wang2021"``, the authors' code (GradientPathologiesPINNs
    at commit 93e752b, ``Helmholtz/Helmholtz2D_model_tf.py``, model ``M2``). With
    ``l`` over the weight matrices ``W_l`` (no biases), ``r`` the reference term
    (the PDE residual) and ``λ_g`` the current weight of group ``g``::

        λ̂_g = max_l max|∂L_r/∂W_l| / ( (1/L) Σ_l mean|∂(λ_g L_g)/∂W_l| )
        λ_g ← (1 - α) λ_g + α λ̂_g,        α = 0.1,   λ_r = 1.

    ``λ_g`` sits inside the differentiated loss, so the denominator is
    ``λ_g · mean_l mean|∂L_g/∂W_l|`` and the average's fixed point is the
    square root of the gradient ratio. The mean is the plain average of the
    per-layer means, not the mean over all entries; there is no epsilon (a
    non-finite estimate keeps the previous weight). The update runs at steps
    0, n, 2n, ... after the step's parameter update, on the same batch, and
    applies from the next step. The paper's text puts α = 0.9 on the new
    estimate; the code puts 0.9 on the old value, which is what we follow. The
    authors' edges share one λ: pass ``groups`` (e.g. ``(0, 1, 1, 1, 1)`` for a
    residual and four edges) to get one weight from their summed loss.

    ``convention="physicsnemo"``: PhysicsNeMo-Sym 2.4.0
    ``physicsnemo/sym/loss/aggregator.py`` ``LRAnnealing``::

        λ_g ← (1 - α) λ_g + α m_r / (m_g + ε),   m_g = mean|∂L_g/∂θ| over all parameters,

    with α = 0.01, ε = 1e-8, λ outside the gradient, every step (from step 0),
    and the reference term updated too (to about 1). PhysicsNeMo multiplies
    the same step's losses by the weights it has just computed; here the
    weights computed on a step apply from the next one, and the default
    ``statistic_at="current"`` evaluates the statistic where PhysicsNeMo does,
    so the weights are PhysicsNeMo's, one step later.

    Args:
      num_losses: K, the number of loss terms.
      alpha: weight of the new estimate in the average (default 0.1, or 0.01
        for ``"physicsnemo"``).
      mode: the numerator's statistic of the reference gradient: ``"max"``
        (``"wang2021"``'s default) or ``"mean"`` (``"physicsnemo"``'s default).
      reference: index of the reference term (of the reference group with ``groups``).
      update_every: recompute every n steps (default 10, the authors'; 1 for
        ``"physicsnemo"``).
      convention: ``"wang2021"`` or ``"physicsnemo"`` (above).
      eps: added to the denominator (default 0, or 1e-8 for ``"physicsnemo"``).
      params_filter: which parameters enter the statistic
        (:mod:`softadapt_jax.statistics`): default ``"kernels"`` (leaves with
        ``ndim >= 2``, the weight matrices; a bias stored as ``[1, n]`` counts
        as a kernel, so pass a callable then), or ``"all"`` for ``"physicsnemo"``.
      update_first: recompute at steps 0, n, 2n, ... (default, both originals)
        rather than n-1, 2n-1, ...
      statistic_at: ``"updated"`` (``"wang2021"``'s default: after the step's
        update) or ``"current"`` (``"physicsnemo"``'s default; saves a forward
        and a backward pass by sharing the step's K backward passes).
      groups: optional length-K group ids; terms of a group share one weight.
      setpoint: optional ``[K]`` prior coefficients.
      dtype: state dtype.

    Returns:
      A :class:`Balancer` needing the ``"grad_abs"`` statistic ``[G, 2]``.

    Raises:
      ValueError: an unknown ``convention``, ``mode`` or ``statistic_at``, a
        ``reference`` outside ``[0, G)``, or an out-of-range ``alpha``/``eps``.
    """
    _checks.check_choice(convention, "convention", LR_ANNEALING_CONVENTIONS)
    wang = convention == "wang2021"
    mode = _checks.check_choice(_pick(mode, "max" if wang else "mean"), "mode", LR_ANNEALING_MODES)
    options = _options(num_losses, _pick(update_every, 10 if wang else 1), 1, setpoint, dtype, groups)
    g = options.num_groups
    if isinstance(reference, bool) or not isinstance(reference, int) or not 0 <= reference < g:
        what = "group" if groups is not None else "loss"
        raise ValueError(f"`reference` must be a {what} index in [0, {g}), got {reference!r}.")
    alpha = _checks.check_float(_pick(alpha, 0.1 if wang else 0.01), "alpha", low=0.0, high=1.0)
    eps = _checks.check_float(_pick(eps, 0.0 if wang else 1e-8), "eps", low=0.0)
    params_filter = _statistics.check_params_filter(_pick(params_filter, "kernels" if wang else "all"))
    column = 0 if mode == "max" else 1

    def estimate(stats: jax.Array, lam: jax.Array) -> jax.Array:
        numerator = stats[reference, column]
        # wang2021 differentiates λ_g L_g: its mean gradient is λ_g times that of L_g.
        denominator = stats[:, 1] * lam if wang else stats[:, 1]
        return numerator / (denominator + eps)

    return _make(
        "lr_annealing",
        "grad_abs",
        _ema_rule(estimate, 1.0 - alpha, alpha, reference if wang else None),
        options,
        update_first=_pick(update_first, True),
        statistic_at=_pick(statistic_at, "updated" if wang else "current"),
        statistic_options=(
            ("params_filter", params_filter),
            ("mean_over", "leaves" if wang else "entries"),
        ),
    )


def inverse_grad_norm_balancer(
    *,
    num_losses: int,
    momentum: float = 0.9,
    update_every: int = 100,
    update_first: bool = True,
    statistic_at: str = "updated",
    params_filter: _statistics.ParamsFilter = "all",
    groups: Sequence[int] | None = None,
    setpoint: Any = None,
    dtype: Any = None,
) -> Balancer:
    """Gradient-norm weighting as in jaxpi (Wang et al. 2023, arXiv:2308.08468).

    Reproduces jaxpi at commit e85b694 (``jaxpi/models.py``,
    ``PINN.compute_weights`` with ``scheme="grad_norm"``, ``update_weights``,
    ``TrainState.apply_weights``)::

        ŵ_g = mean_j ||∇θ L_j|| / ||∇θ L_g||,     w_g ← m w_g + (1 - m) ŵ_g,

    the norms over all parameters flattened into one vector, with no epsilon
    (a non-finite estimate keeps the previous weight) and no renormalisation.
    Like jaxpi's training loop, the update runs at steps 0, n, 2n, ... after
    the step's parameter update, on the same batch, and applies from the next
    step.

    Args:
      num_losses: K.
      momentum: ``m``, 0.9 as jaxpi.
      update_every: recompute every n steps (jaxpi's configs use 1000; 100
        here suits runs of a few thousand steps).
      update_first: recompute at steps 0, n, 2n, ... (jaxpi) rather than n-1, 2n-1, ...
      statistic_at: ``"updated"`` (jaxpi) or ``"current"`` (at the step's own
        parameters, sharing its K backward passes: one forward and one
        backward pass cheaper).
      params_filter: which parameters enter the norm (default all, as jaxpi).
      groups: optional length-K group ids; a group's weight comes from the
        gradient norm of its summed loss.
      setpoint: optional ``[K]`` prior coefficients.
      dtype: state dtype.

    Returns:
      A :class:`Balancer` needing the ``"grad_norm"`` statistic.
    """
    options = _options(num_losses, update_every, 1, setpoint, dtype, groups)
    momentum = _check_momentum(momentum)

    def estimate(norms: jax.Array, _: jax.Array) -> jax.Array:
        return jnp.mean(norms) / norms

    return _make(
        "grad_norm",
        "grad_norm",
        _ema_rule(estimate, momentum, 1.0 - momentum, None),
        options,
        update_first=update_first,
        statistic_at=statistic_at,
        statistic_options=(("params_filter", _statistics.check_params_filter(params_filter)),),
    )


def ntk_balancer(
    *,
    num_losses: int,
    momentum: float | None = None,
    update_every: int | None = None,
    max_points: int | None = None,
    convention: str = "jaxpi",
    update_first: bool | None = None,
    statistic_at: str = "updated",
    params_filter: _statistics.ParamsFilter = "all",
    groups: Sequence[int] | None = None,
    setpoint: Any = None,
    dtype: Any = None,
) -> Balancer:
    """NTK weighting (Wang, Yu & Perdikaris 2022, arXiv:2007.14527).

    Default ``convention="jaxpi"``, jaxpi at commit e85b694 (``jaxpi/models.py``
    ``PINN.compute_weights`` with ``scheme="ntk"``, ``jaxpi/utils.py``
    ``ntk_fn``)::

        m_g = mean_i ||∂r_i/∂θ||²,   ŵ_g = mean_j m_j / m_g,   w_g ← m w_g + (1 - m) ŵ_g,

    ``r_i`` the per-point residuals (or network outputs) of term g, not its
    loss; no epsilon and no renormalisation; updated at steps 0, n, 2n, ...
    after the step's parameter update, on the same batch. Needs
    ``residuals_fn`` in the train step. jaxpi's causal variant (residual NTK
    averaged per time chunk and scaled by the causal weights) is not this.
    A group's ``m_g`` is the mean over the concatenated points of its terms.

    ``convention="physicsnemo"``: PhysicsNeMo-Sym 2.4.0
    ``physicsnemo/sym/loss/aggregator.py`` ``NTK``::

        n_g = ||∂ sqrt|L_g| / ∂θ||,   w_g = Σ_j n_j / n_g,

    no smoothing (``momentum=0``), recomputed every ``run_per_step`` steps
    (default 1000) from step n on, on the parameters the weights then
    multiply, and held between. Deliberate difference: PhysicsNeMo's weights
    are 1 at step 0 and exactly 0 on steps 1 .. n-1 (nothing is stored yet,
    so the whole loss vanishes); here they stay 1 until the first
    evaluation. The statistic of recompute step n-1 is taken after its update
    (the parameters of step n) but on step n-1's batch.

    Args:
      num_losses: K.
      momentum: ``m`` (default 0.9 as jaxpi, 0 for ``"physicsnemo"``).
      update_every: recompute every n steps (default 100; 1000 for ``"physicsnemo"``).
      max_points: ``"jaxpi"`` only: estimate each ``m_g`` from at most the
        first this many points of each term (``None``: all, as jaxpi). Each
        point costs one one-point backward pass
        (:func:`softadapt_jax.statistics.compute_statistic`).
      convention: ``"jaxpi"`` or ``"physicsnemo"`` (above).
      update_first: recompute at steps 0, n, 2n, ... (default for ``"jaxpi"``)
        or n-1, 2n-1, ... (default for ``"physicsnemo"``: its first evaluation
        is at step n, so ours is the step before it).
      statistic_at: ``"updated"`` (default, both originals) or ``"current"``.
      params_filter: which parameters enter (default all, as both originals).
      groups: optional length-K group ids.
      setpoint: optional ``[K]`` prior coefficients.
      dtype: state dtype.

    Returns:
      A :class:`Balancer` needing the ``"ntk_trace"`` statistic (``"jaxpi"``)
      or ``"sqrt_loss_grad_norm"`` (``"physicsnemo"``).

    Raises:
      ValueError: unknown ``convention``, ``max_points`` with ``"physicsnemo"``,
        or an out-of-range ``momentum``.
    """
    _checks.check_choice(convention, "convention", NTK_CONVENTIONS)
    jaxpi = convention == "jaxpi"
    options = _options(num_losses, _pick(update_every, 100 if jaxpi else 1000), 1, setpoint, dtype, groups)
    momentum = _check_momentum(_pick(momentum, 0.9 if jaxpi else 0.0))
    params_filter = _statistics.check_params_filter(params_filter)
    if jaxpi:
        if max_points is not None:
            _checks.check_positive_int(max_points, "max_points")
        statistic = "ntk_trace"
        statistic_options: tuple[tuple[str, Any], ...] = (
            ("max_points", max_points),
            ("params_filter", params_filter),
        )

        def estimate(stats: jax.Array, _: jax.Array) -> jax.Array:
            return jnp.mean(stats) / stats

    else:
        if max_points is not None:
            raise ValueError(
                f"`max_points` applies to convention='jaxpi' only (PhysicsNeMo's NTK uses the gradient "
                f"of sqrt(L), not per-point kernels), got max_points={max_points!r}."
            )
        statistic = "sqrt_loss_grad_norm"
        statistic_options = (("params_filter", params_filter),)

        def estimate(stats: jax.Array, _: jax.Array) -> jax.Array:
            return jnp.sum(stats) / stats

    return _make(
        "ntk",
        statistic,
        _ema_rule(estimate, momentum, 1.0 - momentum, None),
        options,
        update_first=_pick(update_first, jaxpi),
        statistic_at=statistic_at,
        statistic_options=statistic_options,
    )


def grad_norm_balancer(**kwargs: Any) -> Balancer:
    """Deprecated name of :func:`inverse_grad_norm_balancer` (jaxpi's ``grad_norm`` weighting).

    Renamed so that it is not confused with GradNorm (Chen et al. 2018,
    :func:`softadapt_jax.gradients.gradnorm`); this alias goes in 0.3.
    """
    warnings.warn(
        "grad_norm_balancer is deprecated: use inverse_grad_norm_balancer (the same function; "
        "the new name keeps it apart from GradNorm, softadapt_jax.gradients.gradnorm).",
        DeprecationWarning,
        stacklevel=2,
    )
    return inverse_grad_norm_balancer(**kwargs)
