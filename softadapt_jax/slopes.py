"""Finite-difference slopes of a loss history: SoftAdapt's rates of change.

A history is time-major, ``[T, K]``: T loss values (oldest first) for each of K
components. The slope of a component is a first-derivative finite difference of
accuracy order ``n`` over the last ``n + 1`` values, with coefficients computed
exactly (rational arithmetic) once per static order.

Two stencils:

* ``"forward"`` (default, as the original PyTorch SoftAdapt): forward
  coefficients applied oldest-first, i.e. the derivative at the *oldest* point
  of the window. Order 1 is simply ``L[-1] - L[-2]``.
* ``"backward"``: the derivative at the *newest* point of the window, which is
  what "the current rate of change" usually means.

Scale-invariant slopes (``scale``):

* ``"none"`` (default): slopes of the raw losses; they carry the units of each
  loss, so multiplying loss k by c multiplies its slope by c.
* ``"log"``: slopes of ``log L_k``, i.e. relative rates of change; invariant to
  multiplying any loss by a positive constant. Needs positive losses (values
  are floored at the smallest normal float).
* ``"relative"``: slopes of ``L_k / r_k`` with ``r_k`` the ``reference`` option
  (e.g. the initial loss, supplied by the balancer), or, without one, the mean
  of the component over the whole history. Invariant to multiplying a loss by a
  positive constant as long as the reference scales with it.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any, Literal

import jax
import jax.numpy as jnp

from softadapt_jax import _checks

Stencil = Literal["forward", "backward"]
SlopeScale = Literal["none", "log", "relative"]

STENCILS: tuple[str, ...] = ("forward", "backward")
SLOPE_SCALES: tuple[str, ...] = ("none", "log", "relative")
SLOPE_OPTIONS: tuple[str, ...] = ("stencil", "scale", "reference")


@functools.cache
def finite_difference_coefficients(accuracy_order: int, stencil: Stencil = "forward") -> tuple[Fraction, ...]:
    """Exact coefficients of a first derivative over ``accuracy_order + 1`` points.

    The coefficients are applied to the window oldest-first:
    ``slope = sum_j c[j] * L[T - n - 1 + j]``.

    For the forward stencil (derivative at the oldest point, offsets 0..n) the
    coefficients are the derivatives at 0 of the Lagrange basis polynomials:
    ``c_0 = -H_n`` (the n-th harmonic number) and ``c_j = (-1)^(j+1) C(n, j) / j``.
    The backward stencil (derivative at the newest point) is the forward one
    reversed and negated.

    Args:
      accuracy_order: the order ``n >= 1`` of the truncation error.
      stencil: ``"forward"`` or ``"backward"``.

    Returns:
      A tuple of ``n + 1`` exact ``Fraction`` coefficients summing to 0.

    Example:
      >>> finite_difference_coefficients(2)
      (Fraction(-3, 2), Fraction(2, 1), Fraction(-1, 2))
    """
    n = _checks.check_positive_int(accuracy_order, "accuracy_order")
    _checks.check_choice(stencil, "stencil", STENCILS)
    forward = [-sum(Fraction(1, j) for j in range(1, n + 1))]
    forward += [Fraction((-1) ** (j + 1) * math.comb(n, j), j) for j in range(1, n + 1)]
    if stencil == "forward":
        return tuple(forward)
    return tuple(-c for c in reversed(forward))


# The largest rounding error a slope may carry, relative to the loss values: the
# coefficients' absolute sum grows like 2^n / n, and multiplies the rounding error
# of every history entry, so high orders return noise in low precision.
MAX_SLOPE_ROUNDING = 2.0**-10


@functools.cache
def max_stable_order(dtype: Any) -> int:
    """The highest accuracy order whose slope keeps rounding error below ``MAX_SLOPE_ROUNDING``.

    The bound is ``sum_j |c_j| * eps(dtype) <= 2^-10`` (a slope's rounding
    error, relative to the losses, on exactly representable data); it gives 15
    in float32 and far more than any window needs in float64.
    """
    eps = float(jnp.finfo(dtype).eps)
    order = 1
    while order < 512 and _amplification(order + 1) * eps <= MAX_SLOPE_ROUNDING:
        order += 1
    return order


def _amplification(order: int) -> float:
    return float(sum(abs(c) for c in finite_difference_coefficients(order)))


def resolve_accuracy_order(accuracy_order: int | None, num_steps: int, dtype: Any = None) -> int:
    """Returns the order to use for a history of ``num_steps`` entries.

    ``None`` means ``num_steps - 1`` (all points, as the original), capped at
    :func:`max_stable_order` of ``dtype`` when one is given: a float32 window of
    40 gets order 15 (its last 16 entries), since order 39 would amplify the
    rounding of each entry about 10^10-fold. Raises ValueError when the history
    is too short for the order, or when an explicit order exceeds that cap.
    """
    if accuracy_order is None:
        if num_steps < 2:
            raise ValueError(
                f"`history` has T={num_steps} time step(s); a slope needs at least 2 "
                "(accuracy_order=None uses order T - 1)."
            )
        return num_steps - 1 if dtype is None else min(num_steps - 1, max_stable_order(dtype))
    order = _checks.check_positive_int(accuracy_order, "accuracy_order")
    if order + 1 > num_steps:
        raise ValueError(
            f"`accuracy_order`={order} needs {order + 1} time steps, but `history` has only "
            f"T={num_steps}; use accuracy_order <= {num_steps - 1}."
        )
    if dtype is not None and order > max_stable_order(dtype):
        cap = max_stable_order(dtype)
        raise ValueError(
            f"`accuracy_order`={order} is too high for {jnp.dtype(dtype).name} losses: its "
            f"coefficients amplify each entry's rounding error {_amplification(order):.3g}-fold. "
            f"Use accuracy_order <= {cap} (or float64 histories)."
        )
    return order


def check_history(history: Any, name: str = "history", num_losses: int | None = None) -> jax.Array:
    """Validates a ``[T, K]`` history (K = ``num_losses`` when given) and returns it as a float array."""
    arr = _checks.as_float_array(history, name)
    if arr.ndim != 2:
        raise ValueError(
            f"`{name}` must have shape [T, K] (time steps, loss components), got shape "
            f"{tuple(arr.shape)} with {arr.ndim} dimension(s)."
        )
    if arr.shape[1] < 1:
        raise ValueError(f"`{name}` must have K >= 1 loss components, got shape {tuple(arr.shape)}.")
    if num_losses is not None:
        k = _checks.check_positive_int(num_losses, "num_losses")
        if arr.shape[1] != k:
            hint = (
                f" It looks components-major [K, T]: pass `{name}.T` (time-major, oldest first)."
                if arr.shape[0] == k
                else ""
            )
            raise ValueError(
                f"`{name}` must have shape [T, K] with K = num_losses = {k} columns, got shape "
                f"{tuple(arr.shape)}.{hint}"
            )
    return arr


def _scaled(history: jax.Array, scale: str, reference: Any) -> jax.Array:
    """The values whose slopes are taken: raw for ``"none"`` and ``"relative"``, logs for ``"log"``."""
    if scale != "relative" and reference is not None:
        raise ValueError("`reference` is only used with scale='relative'.")
    if scale == "log":
        # A select, not jnp.maximum: maximum's gradient multiplies 1/tiny by 0, which is nan
        # once the upstream gradient makes 1/tiny overflow.
        tiny = jnp.finfo(history.dtype).tiny
        above = history > tiny
        return jnp.log(jnp.where(above, history, tiny))
    return history


def _relative_divisor(history: jax.Array, reference: Any, unit: jax.Array) -> jax.Array:
    """``|r_k|`` for ``scale="relative"`` times ``unit``: the reference, or the mean; 1 where it is 0.

    The mean is taken of the history times ``unit`` (see ``_overflow_unit``), so that the sum
    of huge losses cannot overflow; an explicit reference is returned unscaled (``unit`` is then
    applied to the quotient instead, where a tiny reference cannot underflow).
    """
    if reference is None:
        ref = jnp.mean(history * unit, axis=0)
        one = unit
    else:
        ref = _checks.as_float_array(reference, "reference").astype(history.dtype)
        if ref.shape != history.shape[1:]:
            raise ValueError(f"`reference` must have shape [K]={history.shape[1:]}, got {tuple(ref.shape)}.")
        one = 1
    ref = jax.lax.stop_gradient(ref)
    # A zero reference would divide by zero; such a component keeps raw units.
    return jnp.abs(jnp.where(ref == 0, one, ref))


def _overflow_unit(values: jax.Array, order: int) -> jax.Array:
    """``[K]`` powers of two by which to scale each column before its finite difference.

    1 for every column whose values are small enough that neither the weighted sum of the
    differences (at most ``4 sum_j |c_j|`` times the largest value, with rounding) nor the sum of
    the column (``T`` values, for the relative scale's mean) can overflow; ``2^-m`` for the
    others, with ``2^m`` that bound. A power of two scales exactly (but for the subnormals, which
    are far below the rounding of such a column), so ordinary histories give the same bits as an
    unscaled difference.
    """
    m = math.ceil(math.log2(max(4.0 * _amplification(order), 2.0 * values.shape[0])))
    big = float(jnp.finfo(values.dtype).max)
    magnitude = jax.lax.stop_gradient(functools.reduce(jnp.maximum, [jnp.abs(row) for row in values]))
    return jnp.where(magnitude > big * 2.0**-m, jnp.asarray(2.0**-m, values.dtype), 1).astype(values.dtype)


def _unscale(scaled: jax.Array, factor: jax.Array) -> jax.Array:
    """``scaled * factor``, saturated at the largest finite float (an inf or nan input stays so).

    A slope beyond the float range saturates rather than overflowing to inf, whose product with
    a temperature of 0 (or with a zero cotangent, in the backward pass) would be nan.
    """
    big = jnp.finfo(scaled.dtype).max
    return jnp.where(jnp.isinf(scaled), scaled, jnp.clip(scaled * factor, -big, big))


def rates_of_change(history: Any, accuracy_order: int | None = None, **options: Any) -> jax.Array:
    """Finite-difference slope of each loss component, ``[T, K] -> [K]``.

    By default this reproduces the original SoftAdapt's ``_compute_rates_of_change``
    (forward coefficients, slope at the oldest point of the last
    ``accuracy_order + 1`` values), with exact instead of numerically solved
    coefficients for even orders. Any order >= 1 is supported; the original
    refuses odd orders above 5.

    Args:
      history: loss values, shape ``[T, K]``, oldest first. Integer input is
        promoted to float; float16/bfloat16 to float32.
      accuracy_order: static finite-difference order ``n >= 1``; ``None`` uses
        ``T - 1`` (all points).
      **options: ``stencil`` (``"forward"`` default, or ``"backward"``),
        ``scale`` (``"none"`` default, ``"log"`` or ``"relative"``; see the
        module docstring) and ``reference`` (``[K]`` divisor for
        ``scale="relative"``).

    Returns:
      Slopes of shape ``[K]`` in the history's (promoted) float dtype.

    Raises:
      ValueError: wrong rank, K < 1, order < 1, a history shorter than
        ``order + 1``, or an unknown option name or value.
      TypeError: non-numeric, boolean or complex history; non-integer order.

    Example:
      >>> import jax.numpy as jnp
      >>> h = jnp.array([[0.0], [1.0], [4.0], [9.0], [16.0]])  # t^2
      >>> float(rates_of_change(h, accuracy_order=1)[0])
      7.0
    """
    _checks.check_unknown_options(options, SLOPE_OPTIONS, "rates_of_change")
    stencil = _checks.check_choice(options.get("stencil", "forward"), "stencil", STENCILS)
    scale = _checks.check_choice(options.get("scale", "none"), "scale", SLOPE_SCALES)
    hist = check_history(history)
    order = resolve_accuracy_order(accuracy_order, hist.shape[0], hist.dtype)
    reference = options.get("reference")
    values = _scaled(hist, scale, reference)
    # Huge columns are differenced in a scaled form (times a power of two, undone at the end),
    # so that no intermediate overflows: an overflowing sum is inf or nan, and jit (which fuses
    # multiply-adds) and eager evaluation overflow differently.
    unit = _overflow_unit(values, order)
    coeffs = finite_difference_coefficients(order, stencil)
    window = values[values.shape[0] - (order + 1) :] * unit
    # The coefficients sum to 0 exactly, so differencing against the last row
    # changes nothing in exact arithmetic, but makes a constant history give
    # exactly 0 although the float coefficients do not sum to 0.
    slopes = weighted_row_sum(window - window[-1], [float(c) for c in coeffs])
    if scale != "relative":
        return _unscale(slopes, 1 / unit)
    # Relative slopes divide the raw slopes, not the values: equal values divided
    # apart can differ in the last bit (XLA may contract into FMAs), which a
    # constant history would turn into spurious slopes.
    divisor = _relative_divisor(hist, reference, unit)
    return _unscale(slopes / divisor, 1 if reference is None else 1 / unit)


def weighted_row_sum(rows: jax.Array, coefficients: list[float]) -> jax.Array:
    """``sum_j coefficients[j] * rows[j]`` over the leading (time) axis, unrolled.

    The number of rows is static and small; an unrolled sum fuses into one
    elementwise kernel, whereas a reduction over the time axis of a vmapped
    ``[B, T, K]`` batch is a slow strided reduce on CPU.
    """
    terms = [c * rows[j] for j, c in enumerate(coefficients) if c != 0]
    return functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(rows[0])
