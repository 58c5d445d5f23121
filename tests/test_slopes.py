"""Tests of the finite-difference slopes (:mod:`softadapt_jax.slopes`)."""

from __future__ import annotations

import random
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softadapt_jax import finite_difference_coefficients, rates_of_change

EPS64 = float(np.finfo(np.float64).eps)
ORDERS = range(1, 13)


# ----------------------------------------------------------------------------- exact coefficients
@pytest.mark.parametrize("stencil", ["forward", "backward"])
@pytest.mark.parametrize("order", ORDERS)
def test_coefficients_are_exact_fractions_summing_to_zero(order, stencil):
    coeffs = finite_difference_coefficients(order, stencil)
    assert len(coeffs) == order + 1
    assert all(isinstance(c, Fraction) for c in coeffs)
    assert sum(coeffs) == 0


@pytest.mark.parametrize("order", ORDERS)
def test_backward_is_forward_reversed_and_negated(order):
    forward = finite_difference_coefficients(order, "forward")
    backward = finite_difference_coefficients(order, "backward")
    assert backward == tuple(-c for c in reversed(forward))


@pytest.mark.parametrize("order", [1, 3, 5])
def test_coefficients_match_the_originals_hard_coded_ones_exactly(order, reference_data):
    original = reference_data["finite_difference_coefficients"][str(order)]
    ours = [float(c) for c in finite_difference_coefficients(order)]
    assert ours == [float(c) for c in original]


@pytest.mark.parametrize(
    ("order", "rtol"), [(2, 1e-6), (4, 1e-6), (6, 1e-6), (8, 1e-6), (10, 1e-6), (12, 1e-5)]
)
def test_coefficients_match_the_originals_numerical_ones(order, rtol, reference_data):
    """The original's even orders come from a numerical solve (findiff): equal to 1e-6 relative.

    Order 12 gets 1e-5: findiff's own solve is off by up to 7.2e-6 there (-154.00097602456202 for
    the exact -154); the exact values are checked on polynomials below and against an independent
    Vandermonde solve in test_parity.py.
    """
    ours = np.array([float(c) for c in finite_difference_coefficients(order)])
    original = reference_data["finite_difference_coefficients"][str(order)]
    np.testing.assert_allclose(ours, original, rtol=rtol, atol=0)


def test_docstring_example_second_order():
    assert finite_difference_coefficients(2) == (Fraction(-3, 2), Fraction(2), Fraction(-1, 2))
    assert finite_difference_coefficients(1) == (Fraction(-1), Fraction(1))
    assert finite_difference_coefficients(1, "backward") == (Fraction(-1), Fraction(1))


# ----------------------------------------------------------------------------- exactness on polynomials
def _poly(coeffs: list[int], t: Fraction) -> Fraction:
    return sum(Fraction(c) * t**i for i, c in enumerate(coeffs))


def _dpoly(coeffs: list[int], t: Fraction) -> Fraction:
    return sum(Fraction(i * c) * t ** (i - 1) for i, c in enumerate(coeffs) if i > 0)


@pytest.mark.parametrize("stencil", ["forward", "backward"])
@pytest.mark.parametrize("order", ORDERS)
def test_derivative_of_polynomials_up_to_degree_n_is_exact(order, stencil, x64):
    """Degree <= n polynomials: exact in rational arithmetic, and to float64 rounding in JAX.

    The history is longer than the window (two extra points before it), so this also checks that
    the window is the *last* n + 1 values and where the derivative is taken: at the oldest window
    point for "forward", the newest for "backward".
    """
    rng = random.Random(1000 * order + len(stencil))
    num_steps = order + 3
    times = [Fraction(t) for t in range(num_steps)]
    at = times[num_steps - order - 1] if stencil == "forward" else times[-1]
    coeffs = finite_difference_coefficients(order, stencil)
    polys = [[rng.randint(-9, 9) for _ in range(degree + 1)] for degree in range(order + 1)]
    history = np.array([[float(_poly(p, t)) for p in polys] for t in times])  # [T, K], exact
    slopes = np.asarray(rates_of_change(history, order, stencil=stencil))
    chex.assert_shape(slopes, (len(polys),))
    assert slopes.dtype == np.float64
    for k, p in enumerate(polys):
        window = [_poly(p, t) for t in times[num_steps - order - 1 :]]
        exact = sum(c * v for c, v in zip(coeffs, window, strict=True))
        assert exact == _dpoly(p, at)  # exact rational arithmetic
        scale = float(sum(abs(c) * abs(v) for c, v in zip(coeffs, window, strict=True)))
        assert abs(slopes[k] - float(exact)) <= 64 * EPS64 * scale, (k, slopes[k], exact)


@pytest.mark.parametrize(
    ("order", "stencil", "expected"),
    [
        (None, "forward", 0.0),
        (1, "forward", 7.0),
        (2, "forward", 4.0),
        (3, "forward", 2.0),
        (1, "backward", 7.0),
        (2, "backward", 8.0),
        (4, "backward", 8.0),
    ],
)
def test_t_squared_examples(order, stencil, expected, x64):
    """The notes' example: t^2 = [0, 1, 4, 9, 16]; forward is d/dt at the oldest window point."""
    history = jnp.array([[0.0], [1.0], [4.0], [9.0], [16.0]])
    np.testing.assert_allclose(rates_of_change(history, order, stencil=stencil), [expected], atol=1e-12)


def test_default_order_uses_the_whole_history():
    history = jnp.asarray(np.random.default_rng(0).random((6, 3)), jnp.float32)
    chex.assert_trees_all_close(rates_of_change(history), rates_of_change(history, 5))
    chex.assert_trees_all_close(rates_of_change(history, 2), rates_of_change(history[-3:], None))


def test_jit_with_static_order_matches_eager():
    history = jnp.asarray(np.random.default_rng(1).random((7, 4)), jnp.float32)
    fn = jax.jit(rates_of_change, static_argnums=1, static_argnames=("stencil", "scale"))
    for order in (1, 4):
        for stencil in ("forward", "backward"):
            chex.assert_trees_all_close(
                fn(history, order, stencil=stencil),
                rates_of_change(history, order, stencil=stencil),
                rtol=1e-6,
                atol=1e-6,
            )


# ----------------------------------------------------------------------------- scale invariance
def _positive_history(seed: int, shape=(6, 3)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.exp(rng.uniform(-3, 3, size=shape))


@pytest.mark.parametrize("stencil", ["forward", "backward"])
@pytest.mark.parametrize("order", [None, 1, 2, 3])
def test_log_scale_is_invariant_to_multiplying_a_component(order, stencil, x64):
    history = _positive_history(2)
    factors = np.array([1.0, 1e5, 3e-6])
    base = rates_of_change(history, order, stencil=stencil, scale="log")
    scaled = rates_of_change(history * factors, order, stencil=stencil, scale="log")
    chex.assert_trees_all_close(scaled, base, rtol=1e-9, atol=1e-9)
    # ... and equals the slope of log L.
    chex.assert_trees_all_close(base, rates_of_change(np.log(history), order, stencil=stencil), atol=1e-12)


def test_log_scale_invariance_float32():
    history = _positive_history(3).astype(np.float32)
    factors = np.array([1.0, 1e3, 1e-3], np.float32)
    chex.assert_trees_all_close(
        rates_of_change(history * factors, scale="log"), rates_of_change(history, scale="log"), atol=1e-4
    )


@pytest.mark.parametrize("stencil", ["forward", "backward"])
@pytest.mark.parametrize("order", [None, 1, 3])
def test_relative_scale_is_invariant_to_multiplying_a_component(order, stencil, x64):
    history = _positive_history(4)
    factors = np.array([1.0, 1e5, 3e-6])
    kw = dict(stencil=stencil, scale="relative")
    # Without a reference the divisor is the component's mean over the history.
    chex.assert_trees_all_close(
        rates_of_change(history * factors, order, **kw), rates_of_change(history, order, **kw), rtol=1e-9
    )
    chex.assert_trees_all_close(
        rates_of_change(history, order, **kw),
        rates_of_change(history, order, stencil=stencil) / history.mean(axis=0),
        rtol=1e-12,
    )
    # With a reference that scales with the loss (e.g. the initial loss).
    reference = history[0]
    chex.assert_trees_all_close(
        rates_of_change(history * factors, order, reference=reference * factors, **kw),
        rates_of_change(history, order, reference=reference, **kw),
        rtol=1e-9,
    )
    chex.assert_trees_all_close(
        rates_of_change(history, order, reference=reference, **kw),
        rates_of_change(history, order, stencil=stencil) / reference,
        rtol=1e-12,
    )


def test_relative_scale_zero_reference_keeps_raw_units(x64):
    history = _positive_history(5)
    reference = np.array([0.0, 2.0, 4.0])
    out = rates_of_change(history, 2, scale="relative", reference=reference)
    raw = rates_of_change(history, 2)
    chex.assert_trees_all_close(out, raw / np.array([1.0, 2.0, 4.0]), rtol=1e-12)


def test_raw_scale_multiplies_the_slope(x64):
    history = _positive_history(6)
    factors = np.array([1.0, 1e5, 3e-6])
    chex.assert_trees_all_close(
        rates_of_change(history * factors), rates_of_change(history) * factors, rtol=1e-9
    )


# ----------------------------------------------------------------------------- dtypes
def test_integer_input_is_promoted():
    history = np.array([[1, 10], [4, 8], [9, 5]], dtype=np.int32)
    out = rates_of_change(history, 1)
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(out, jnp.array([5.0, -3.0]))
    out = rates_of_change(history.tolist(), 2)  # nested lists of Python ints
    assert jnp.issubdtype(out.dtype, jnp.floating)


def test_integer_input_is_promoted_to_float64_with_x64(x64):
    out = rates_of_change(np.array([[1], [4], [9]], dtype=np.int64))
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, [2.0])  # d/dt t^2 at t=1 (order 2, forward at the oldest point)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_is_promoted_to_float32(dtype):
    history = jnp.asarray([[1.0, 8.0], [2.0, 4.0], [4.0, 2.0]], dtype)
    out = rates_of_change(history, 1)
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(out, jnp.array([2.0, -2.0]))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("shape", [(5,), (), (2, 3, 4)])
def test_wrong_rank_raises(shape):
    with pytest.raises(ValueError, match=r"`history` must have shape \[T, K\].*dimension"):
        rates_of_change(np.ones(shape))


def test_no_components_raises():
    with pytest.raises(ValueError, match=r"K >= 1.*\(5, 0\)"):
        rates_of_change(np.ones((5, 0)))


def test_history_too_short_for_the_order_raises():
    with pytest.raises(ValueError, match=r"`accuracy_order`=4 needs 5 time steps.*T=4"):
        rates_of_change(np.ones((4, 2)), 4)
    with pytest.raises(ValueError, match=r"`history` has T=1 time step"):
        rates_of_change(np.ones((1, 2)))


@pytest.mark.parametrize("order", [0, -1])
def test_order_below_one_raises(order):
    with pytest.raises(ValueError, match=rf"`accuracy_order` must be an integer >= 1, got {order}"):
        rates_of_change(np.ones((5, 2)), order)
    with pytest.raises(ValueError, match="accuracy_order"):
        finite_difference_coefficients(order)


@pytest.mark.parametrize("order", [2.0, True, "2", np.float32(2)])
def test_non_integer_order_raises_type_error(order):
    with pytest.raises(TypeError, match="`accuracy_order` must be an integer"):
        rates_of_change(np.ones((5, 2)), order)
    with pytest.raises(TypeError, match="accuracy_order"):
        finite_difference_coefficients(order)


def test_numpy_integer_order_is_accepted():
    chex.assert_trees_all_close(
        rates_of_change(np.arange(10.0).reshape(5, 2), np.int64(2)),
        rates_of_change(np.arange(10.0).reshape(5, 2), 2),
    )


def test_unknown_option_raises():
    with pytest.raises(ValueError, match=r"rates_of_change got unknown option\(s\) \['stencl'\]"):
        rates_of_change(np.ones((5, 2)), stencl="backward")


def test_unknown_stencil_or_scale_raises():
    with pytest.raises(
        ValueError, match=r"`stencil` must be one of \['backward', 'forward'\], got 'central'"
    ):
        rates_of_change(np.ones((5, 2)), stencil="central")
    with pytest.raises(ValueError, match="stencil"):
        finite_difference_coefficients(2, "central")
    with pytest.raises(ValueError, match=r"`scale` must be one of .*got 'sqrt'"):
        rates_of_change(np.ones((5, 2)), scale="sqrt")


def test_reference_misuse_raises():
    with pytest.raises(ValueError, match=r"`reference` is only used with scale='relative'"):
        rates_of_change(np.ones((5, 2)), reference=np.ones(2))
    with pytest.raises(ValueError, match=r"`reference` is only used with scale='relative'"):
        rates_of_change(np.ones((5, 2)), scale="log", reference=np.ones(2))
    with pytest.raises(ValueError, match=r"`reference` must have shape \[K\]"):
        rates_of_change(np.ones((5, 2)), scale="relative", reference=np.ones(3))


@pytest.mark.parametrize(
    "history",
    [np.ones((5, 2), dtype=bool), np.ones((5, 2)) * 1j, np.array([["a", "b"], ["c", "d"]]), "abc"],
    ids=["bool", "complex", "strings", "str"],
)
def test_non_real_input_raises_type_error(history):
    with pytest.raises(TypeError, match="`history` must"):
        rates_of_change(history)


def test_none_history_raises_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="`history`"):
        rates_of_change(None)
