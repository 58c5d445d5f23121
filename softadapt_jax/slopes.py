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


def resolve_accuracy_order(accuracy_order: int | None, num_steps: int) -> int:
    """Returns the order to use for a history of ``num_steps`` entries.

    ``None`` means ``num_steps - 1`` (all points, as the original). Raises
    ValueError when the history is too short for the order.
    """
    if accuracy_order is None:
        if num_steps < 2:
            raise ValueError(
                f"`history` has T={num_steps} time step(s); a slope needs at least 2 "
                "(accuracy_order=None uses order T - 1)."
            )
        return num_steps - 1
    order = _checks.check_positive_int(accuracy_order, "accuracy_order")
    if order + 1 > num_steps:
        raise ValueError(
            f"`accuracy_order`={order} needs {order + 1} time steps, but `history` has only "
            f"T={num_steps}; use accuracy_order <= {num_steps - 1}."
        )
    return order


def check_history(history: Any, name: str = "history") -> jax.Array:
    """Validates a ``[T, K]`` history and returns it as a float array."""
    arr = _checks.as_float_array(history, name)
    if arr.ndim != 2:
        raise ValueError(
            f"`{name}` must have shape [T, K] (time steps, loss components), got shape "
            f"{tuple(arr.shape)} with {arr.ndim} dimension(s)."
        )
    if arr.shape[1] < 1:
        raise ValueError(f"`{name}` must have K >= 1 loss components, got shape {tuple(arr.shape)}.")
    return arr


def _scaled(history: jax.Array, scale: str, reference: Any) -> jax.Array:
    if scale == "none":
        if reference is not None:
            raise ValueError("`reference` is only used with scale='relative'.")
        return history
    if scale == "log":
        if reference is not None:
            raise ValueError("`reference` is only used with scale='relative'.")
        return jnp.log(jnp.maximum(history, jnp.finfo(history.dtype).tiny))
    if reference is None:
        ref = jnp.mean(history, axis=0)
    else:
        ref = _checks.as_float_array(reference, "reference").astype(history.dtype)
        if ref.shape != history.shape[1:]:
            raise ValueError(f"`reference` must have shape [K]={history.shape[1:]}, got {tuple(ref.shape)}.")
    ref = jax.lax.stop_gradient(ref)
    # A zero reference would divide by zero; such a component keeps raw units.
    safe = jnp.where(ref == 0, 1, ref)
    return history / jnp.abs(safe)


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
    order = resolve_accuracy_order(accuracy_order, hist.shape[0])
    hist = _scaled(hist, scale, options.get("reference"))
    coeffs = finite_difference_coefficients(order, stencil)
    window = hist[hist.shape[0] - (order + 1) :]
    # The coefficients sum to 0 exactly, so differencing against the last row
    # changes nothing in exact arithmetic, but makes a constant history give
    # exactly 0 although the float coefficients do not sum to 0.
    return weighted_row_sum(window - window[-1], [float(c) for c in coeffs])


def weighted_row_sum(rows: jax.Array, coefficients: list[float]) -> jax.Array:
    """``sum_j coefficients[j] * rows[j]`` over the leading (time) axis, unrolled.

    The number of rows is static and small; an unrolled sum fuses into one
    elementwise kernel, whereas a reduction over the time axis of a vmapped
    ``[B, T, K]`` batch is a slow strided reduce on CPU.
    """
    terms = [c * rows[j] for j, c in enumerate(coefficients) if c != 0]
    return functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(rows[0])
