"""SoftAdapt weights: pure functions from a loss history ``[T, K]`` to weights ``[K]``.

The three variants of Heydari, Thompson & Mehmood (2019), arXiv:1912.12355, as
implemented by the original PyTorch package (``softadapt`` 0.0.5):

* ``"original"``:      ``w = softmax(beta * s)``
* ``"normalized"``:    ``w = softmax(beta * s / sum(s))``
* ``"loss_weighted"``: ``w_k ∝ mean_t(L[:, k]) * exp(beta * s_k)``

with ``s`` the finite-difference slopes (:func:`softadapt_jax.rates_of_change`)
and the original's softmax ``w = e / (sum(e) + eps)``, ``eps = 1e-8``.

Where the original returns nan, these functions return finite weights instead,
and say so here:

* The exponent is shifted by ``max(beta * x)`` (the original shifts by
  ``max(x)``, which overflows for ``beta < 0``), with ``eps`` rescaled to match:
  identical values wherever the original is finite.
* ``normalized`` with a signed slope sum of exactly 0 (the original divides by
  it and returns nan): the normalized slopes are taken as 0, i.e. uniform
  weights.
* Non-finite values anywhere in the history (the original propagates nan):
  uniform weights (``1/K``, or 1 each with ``sum_to_k``).
* ``loss_weighted`` whose means are all 0 (0/0 with ``eps=0``): uniform weights.
  Negative means (losses should be >= 0) are clipped to 0.

Options that fix the original's flaws (all off by default, so the default
reproduces the original):

* ``stencil="backward"``: slope at the newest point of the window.
* ``scale="log"`` / ``"relative"``: unit-free slopes (see :mod:`softadapt_jax.slopes`).
* ``normalization="l1"``: divide by ``sum(|s|)`` instead of the signed sum,
  which keeps the ranking when every loss falls.
* ``sum_to_k=True``: weights sum to K, so uniform weights equal plain summation.
* ``eps``: the denominator's stabiliser (default ``1e-8`` as the original;
  ``0.0`` makes the weights sum to exactly 1 even for tiny losses).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from softadapt_jax import _checks
from softadapt_jax.slopes import (
    SLOPE_SCALES,
    STENCILS,
    check_history,
    rates_of_change,
    resolve_accuracy_order,
    weighted_row_sum,
)

Variant = Literal["original", "normalized", "loss_weighted"]
VARIANTS: tuple[str, ...] = ("original", "normalized", "loss_weighted")
NORMALIZATIONS: tuple[str, ...] = ("sum", "l1")
REFERENCE_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class SoftAdaptOptions:
    """Static options of :func:`softadapt_weights` (hashable, so usable as jit statics).

    Attributes:
      stencil: ``"forward"`` (slope at the oldest window point, as the original)
        or ``"backward"`` (slope at the newest point).
      scale: ``"none"`` (raw slopes, as the original), ``"log"`` or ``"relative"``.
      normalization: ``"sum"`` (signed sum, as the original) or ``"l1"``;
        used by the ``normalized`` variant only.
      sum_to_k: if True the weights sum to K instead of 1.
      eps: added to the softmax denominator, as the original's ``1e-8``.
    """

    stencil: str = "forward"
    scale: str = "none"
    normalization: str = "sum"
    sum_to_k: bool = False
    eps: float = REFERENCE_EPS

    def __post_init__(self) -> None:
        _checks.check_choice(self.stencil, "stencil", STENCILS)
        _checks.check_choice(self.scale, "scale", SLOPE_SCALES)
        _checks.check_choice(self.normalization, "normalization", NORMALIZATIONS)
        if not isinstance(self.sum_to_k, bool):
            raise TypeError(f"`sum_to_k` must be a bool, got {self.sum_to_k!r}.")
        if isinstance(self.eps, jax.Array):
            raise TypeError(
                f"`eps` is static configuration and must be a Python float, got an array {self.eps!r}. "
                "Under optax.inject_hyperparams, pass static_args=softadapt_jax.SOFTADAPT_STATIC_ARGS."
            )
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps >= 0:
            raise ValueError(f"`eps` must be a float >= 0, got {self.eps!r}.")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any], where: str) -> SoftAdaptOptions:
        """Builds options from keyword arguments, rejecting unknown names."""
        _checks.check_unknown_options(options, [f.name for f in dataclasses.fields(cls)], where)
        return cls(**options)


def stable_softmax(
    x: jax.Array, beta: Any = 1.0, prior: jax.Array | None = None, eps: float = REFERENCE_EPS
) -> jax.Array:
    """The original's softmax ``prior * e / (sum(prior * e) + eps)``, overflow-proof.

    The original computes ``e = exp(beta * (x - max x))``, which overflows for
    ``beta < 0``. Here ``e' = exp(z - max z)`` with ``z = beta * x``, and the
    stabiliser is rescaled to ``eps * exp(beta * max x - max z)`` so that the
    result is *identical* to the original's wherever the original is finite
    (``e = e' / a`` with ``a`` that factor). Infinite ``z`` is clipped to the
    largest finite float first, so no input gives nan or inf. A prior enters
    the exponent as ``log(prior)``, which changes nothing in exact arithmetic
    but never forms a huge product whose reciprocal is subnormal (flushed to 0
    on CPU, which zeroed every weight). Negative or nan prior entries count as
    0, infinite ones as the largest float. When the denominator is not
    positive (all priors 0 with ``eps = 0``) the result is uniform.

    Args:
      x: ``[K]`` scores (slopes), K >= 1.
      beta: scalar temperature multiplying the scores.
      prior: optional ``[K]`` factors (the loss-weighted means), >= 0.
      eps: stabiliser of the original (``1e-8``); 0 for an exact simplex.

    Returns:
      ``[K]`` non-negative weights summing to at most 1.

    Raises:
      TypeError: non-numeric ``x`` or ``prior``.
      ValueError: ``x`` not a ``[K]`` vector with K >= 1, or ``prior`` of another shape.
    """
    x = _checks.as_float_array(x, "x")
    if x.ndim != 1 or x.shape[0] < 1:
        raise ValueError(f"`x` must be a [K] vector of scores with K >= 1, got shape {tuple(x.shape)}.")
    big = jnp.finfo(x.dtype).max
    z = jnp.clip(jnp.nan_to_num(beta * x, nan=0.0), -big, big)
    # The original's shift is beta * max(x); its eps is rescaled by exp(that shift - ours).
    ref_shift = jnp.clip(jnp.nan_to_num(beta * _reduce(jnp.maximum, x), nan=0.0), -big, big)
    if prior is not None:
        prior = _checks.as_float_array(prior, "prior").astype(x.dtype)
        if prior.shape != x.shape:
            raise ValueError(
                f"`prior` must have the shape of `x`, {tuple(x.shape)}, got {tuple(prior.shape)}."
            )
        prior = jnp.clip(jnp.nan_to_num(prior, nan=0.0, posinf=big), 0.0, big)
        positive = prior > 0
        log_prior = jnp.log(jnp.where(positive, prior, 1.0))
        z = jnp.where(positive, jnp.clip(z + log_prior, -big, big), -jnp.inf)
    z_max = jax.lax.stop_gradient(_reduce(jnp.maximum, z))
    has_mass = z_max > -jnp.inf
    z_max = jnp.where(has_mass, z_max, 0.0)
    e = jnp.exp(z - z_max)
    # exp(<= 0) without a prior: underflows to 0 exactly where the original overflows.
    denom = _reduce(jnp.add, e)
    if eps != 0:  # static: with eps = 0 there is no stabiliser term (and no 0 * inf)
        # Capped one below log(max float), whose exp rounds up to inf.
        eps_exponent = jnp.minimum(ref_shift - z_max, jnp.log(big) - 1.0)
        denom = denom + eps * jnp.exp(eps_exponent)
    ok = denom > 0
    uniform = jnp.full_like(e, 1.0 / e.shape[0])
    return jnp.where(ok, e / jnp.where(ok, denom, 1.0), uniform)


def _reduce(op: Any, x: jax.Array) -> jax.Array:
    """``op``-reduction of a ``[K]`` vector, unrolled over the static K.

    Under ``vmap`` a reduction over a short minor axis is a slow strided reduce
    on CPU; K pairwise elementwise ops fuse with their neighbours instead.
    """
    if x.shape[0] > 32:
        return jnp.max(x) if op is jnp.maximum else jnp.sum(x)
    return functools.reduce(op, [x[k] for k in range(x.shape[0])])


@jax.custom_jvp
def _safe_divide(x: jax.Array, d: jax.Array) -> jax.Array:
    """``x / d``, saturated at the largest finite float, and 0 where ``d == 0``.

    The derivative is taken in the quotient form ``(dx - q dd) / d``: JAX's own rule for a
    quotient multiplies by ``d^-2``, which overflows once ``|d|`` is below the square root of the
    smallest normal float (slopes summing to 1e-38), and its product with a zero cotangent is nan.
    """
    zero = d == 0
    big = jnp.finfo(jnp.result_type(x, d)).max
    return jnp.where(zero, 0.0, jnp.clip(x / jnp.where(zero, 1.0, d), -big, big))


@_safe_divide.defjvp
def _safe_divide_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]) -> Any:
    x, d = primals
    dx, dd = tangents
    q = _safe_divide(x, d)
    zero = d == 0
    return q, jnp.where(zero, 0.0, (dx - q * dd) / jnp.where(zero, 1.0, d))


def _normalize(slopes: jax.Array, l1: bool) -> jax.Array:
    """``s / sum(s)`` (``s / sum(|s|)`` when ``l1``), 0 where the sum is 0, in a scaled form.

    Slopes so large that their sum could overflow are first scaled by a power of two (the
    quotient does not change; for other slopes nothing is scaled, so the bits are the same).
    """
    k = slopes.shape[0]
    big = float(jnp.finfo(slopes.dtype).max)
    unit = 2.0 ** -math.ceil(math.log2(2.0 * k))
    magnitude = jax.lax.stop_gradient(_reduce(jnp.maximum, jnp.abs(slopes)))
    slopes = slopes * jnp.where(magnitude > big * unit, unit, 1).astype(slopes.dtype)
    return _safe_divide(slopes, _reduce(jnp.add, jnp.abs(slopes) if l1 else slopes))


def softadapt_weights(
    history: Any,
    beta: Any = 0.1,
    *,
    variant: Variant = "original",
    accuracy_order: int | None = None,
    num_losses: int | None = None,
    **options: Any,
) -> jax.Array:
    """SoftAdapt weights of K loss components from their recent history.

    ``beta > 0`` favours the worst-performing (slowest-decreasing) component,
    ``beta < 0`` the best, and ``beta = 0`` gives uniform weights (loss-weighted:
    proportional to the mean losses). ``variant``, ``accuracy_order`` and the
    options are static; ``history`` and ``beta`` are traced, so ``jax.vmap``
    over either does not recompile.

    Args:
      history: ``[T, K]`` loss values, oldest first (T time steps, K components).
      beta: scalar temperature (an array; may be traced or vmapped).
      variant: ``"original"`` (default, the paper's plain formula),
        ``"normalized"`` or ``"loss_weighted"``. The optax transform
        :func:`~softadapt_jax.softadapt` and ``softadapt_balancer`` default to
        ``"loss_weighted"`` instead, which the original's README recommends
        for training.
      accuracy_order: finite-difference order >= 1 over the last ``order + 1``
        values; ``None`` (default) uses ``T - 1``, as the original, capped at
        15 in float32 (:func:`softadapt_jax.slopes.max_stable_order`: a higher
        order's slope would carry more rounding error than signal); an
        explicit order above that cap raises.
      num_losses: optional K; when given, a history without K columns raises,
        and one of shape ``[K, T]`` (components-major, as the original takes
        it) is named as such.
      **options: see :class:`SoftAdaptOptions` (``stencil``, ``scale``,
        ``normalization``, ``sum_to_k``, ``eps``) and ``reference`` for
        ``scale="relative"``.

    Returns:
      ``[K]`` non-negative, finite weights in the history's float dtype,
      summing to 1 (up to the original's ``eps``), or to K with ``sum_to_k``.

    Raises:
      ValueError: history not ``[T, K]`` with K >= 1 and ``T >= order + 1``;
        ``accuracy_order < 1``; unknown variant or option; non-scalar beta.
      TypeError: non-numeric, boolean or complex history or beta.

    Example (the README of the original, first example):
      >>> import jax.numpy as jnp
      >>> h = jnp.array([[1, 2, 3, 4, 5], [150, 100, 50, 10, 0.1],
      ...                [1500, 1000, 500, 100, 1]]).T
      >>> softadapt_weights(h, 0.1)  # doctest: +SKIP
      Array([9.9343e-01, 6.5666e-03, 3.8908e-22], dtype=float32)
    """
    _checks.check_choice(variant, "variant", VARIANTS)
    reference = options.pop("reference", None)
    opts = SoftAdaptOptions.from_kwargs(options, "softadapt_weights")
    hist = check_history(history, num_losses=num_losses)
    resolve_accuracy_order(accuracy_order, hist.shape[0], hist.dtype)
    beta = _checks.check_scalar(beta, "beta").astype(hist.dtype)
    return _weights(
        hist, beta, variant=variant, accuracy_order=accuracy_order, opts=opts, reference=reference
    )


def _weights(
    hist: jax.Array,
    beta: jax.Array,
    variant: str,
    accuracy_order: int | None,
    opts: SoftAdaptOptions,
    reference: Any = None,
) -> jax.Array:
    num_components = hist.shape[1]
    slopes = rates_of_change(
        hist, accuracy_order, stencil=opts.stencil, scale=opts.scale, reference=reference
    )
    prior = None
    if variant == "normalized":
        slopes = _normalize(slopes, opts.normalization == "l1")
    elif variant == "loss_weighted":
        # Negative means would give negative weights; losses are >= 0 anyway.
        t = hist.shape[0]
        prior = jnp.maximum(weighted_row_sum(hist, [1.0 / t] * t), 0)
    w = stable_softmax(slopes, beta, prior, opts.eps)
    finite = jnp.all(jnp.isfinite(hist))
    w = jnp.where(finite, w, jnp.full_like(w, 1.0 / num_components))
    if opts.sum_to_k:
        w = w * num_components
    return w
