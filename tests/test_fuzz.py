"""Fuzz suite of the safety net (issue 15, item 7): hostile inputs, as a user could give them.

Each property is an ``assert_*`` helper that states it; the tests apply it to every method through
``pytest.mark.parametrize`` while hypothesis draws the inputs (loss streams with zeros, subnormals,
values up to the largest float32, nan and +-inf bursts; histories, scores and priors of every
scale; Gramians with zero, duplicate and huge rows). Every jitted function is built once per
configuration (cached) and fed inputs of one fixed shape, so examples never recompile: the cost is
one compilation per configuration, and the examples are cheap. ``derandomize=True`` and no example
database make every run draw the same examples, so a property marked ``xfail(strict=True)`` fails
the same way every time.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

import softadapt_jax as sj
from softadapt_jax.flax.nnx import make_nnx_train_step

FUZZ_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Eager evaluation costs milliseconds per call (one dispatch per operation): fewer examples.
EAGER_SETTINGS = settings(FUZZ_SETTINGS, max_examples=10)

F32_MAX = float(np.finfo(np.float32).max)
# Boundary values of float32 losses: zero, the smallest subnormal, a subnormal 1e-38, the smallest
# normal, one, and huge finite values whose sum or square overflows.
SPECIAL_VALUES = (0.0, 1e-45, 1e-38, float(np.finfo(np.float32).tiny), 1.0, 1e20, 3e38, F32_MAX)
NON_FINITE = (np.nan, np.inf, -np.inf)


# ----------------------------------------------------------------------------- strategies
# Log-spaced magnitudes (mantissa 1.37, so that no value is a power of ten) across the whole range,
# and fractions of the largest float whose sums or squares overflow.
LOG_SPACED = tuple(float(np.float32(1.37 * 10.0**e)) for e in range(-45, 38, 3))
NEAR_MAX = tuple(float(np.float32(F32_MAX / d)) for d in (2.0, 3.0, 4.0, 5.0, 16.0, 64.0))
PALETTE = SPECIAL_VALUES + LOG_SPACED + NEAR_MAX


def finite_losses() -> st.SearchStrategy[float]:
    """Non-negative finite float32 values: the boundary values, every magnitude, or any float."""
    return st.one_of(st.sampled_from(PALETTE), st.floats(0.0, F32_MAX, width=32))


@st.composite
def loss_streams(draw: st.DrawFn, num_steps: int, num_losses: int) -> np.ndarray:
    """``[T, K]`` float32 loss streams: finite values of every scale, then up to 3 non-finite bursts.

    The values come from :data:`PALETTE`, the log-spaced ones times one random mantissa per stream
    (drawing each entry as an arbitrary float costs several times more, for every example of every
    case). A burst overwrites a run of 1..4 steps of some components with one of nan, inf, -inf.
    """
    stream = draw(hnp.arrays(np.float32, (num_steps, num_losses), elements=st.sampled_from(PALETTE))).copy()
    mantissa = np.float32(draw(st.floats(1.0, 9.5, width=32)))
    scaled = np.isin(stream, np.asarray(LOG_SPACED, np.float32))
    with np.errstate(over="ignore"):
        stream[scaled] = np.minimum(stream[scaled] * mantissa, np.float32(F32_MAX))
    for _ in range(draw(st.integers(0, 3))):
        start = draw(st.integers(0, num_steps - 1))
        length = draw(st.integers(1, 4))
        columns = draw(st.lists(st.integers(0, num_losses - 1), min_size=1, max_size=num_losses, unique=True))
        stream[start : start + length, columns] = draw(st.sampled_from(NON_FINITE))
    return stream


# ----------------------------------------------------------------------------- helpers
def float_leaves_finite(tree: Any) -> jax.Array:
    """Whether every floating leaf of ``tree`` is finite (True when there is none)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


# ----------------------------------------------------------------------------- 1. loss-statistics balancers
NUM_STEPS, NUM_LOSSES = 24, 3
GROUPS = (0, 1, 0)  # terms 0 and 2 share a weight: two huge finite terms overflow their group's sum


class Schedule(NamedTuple):
    accumulate: int
    update_every: int
    grouped: bool

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(
            accumulate=self.accumulate,
            update_every=self.update_every,
            groups=GROUPS if self.grouped else None,
        )

    def __str__(self) -> str:
        return f"acc{self.accumulate}-every{self.update_every}" + ("-groups" if self.grouped else "")


def _softadapt(variant: str, scale: str, beta: float) -> Callable[..., sj.Balancer]:
    return lambda **kw: sj.softadapt_balancer(
        beta, num_losses=NUM_LOSSES, window=4, variant=variant, scale=scale, **kw
    )


# Every factory and named convention; softadapt in its 3 variants x 3 scales, at temperatures of both
# signs and a large magnitude (the slopes of huge losses times beta overflow the softmax's input).
BALANCERS: dict[str, Callable[..., sj.Balancer]] = {
    f"softadapt-{variant}-{scale}": _softadapt(variant, scale, beta)
    for (variant, scale), beta in zip(
        itertools.product(("original", "normalized", "loss_weighted"), ("none", "log", "relative")),
        itertools.cycle((0.1, 10.0, -10.0)),
    )
}
BALANCERS |= {
    "ratio-ratio": lambda **kw: sj.ratio_softadapt_balancer(num_losses=NUM_LOSSES, form="ratio", **kw),
    "ratio-difference": lambda **kw: sj.ratio_softadapt_balancer(
        num_losses=NUM_LOSSES, form="difference", **kw
    ),
    "relobralo-bischof": lambda **kw: sj.relobralo_balancer(
        num_losses=NUM_LOSSES, convention="bischof", **kw
    ),
    # expected_rho < 1 so that the lookback resets are drawn too.
    "relobralo-physicsnemo": lambda **kw: sj.relobralo_balancer(
        num_losses=NUM_LOSSES, convention="physicsnemo", expected_rho=0.5, **kw
    ),
    "dwa": lambda **kw: sj.dwa_balancer(num_losses=NUM_LOSSES, **kw),
    "rlw": lambda **kw: sj.rlw_balancer(num_losses=NUM_LOSSES, **kw),
    "uncertainty-libmtl": lambda **kw: sj.uncertainty_balancer(
        num_losses=NUM_LOSSES, convention="libmtl", **kw
    ),
    "uncertainty-physicsnemo": lambda **kw: sj.uncertainty_balancer(
        num_losses=NUM_LOSSES, convention="physicsnemo", **kw
    ),
    "fixed": lambda **kw: sj.fixed_balancer(num_losses=NUM_LOSSES, **kw),
}

# One schedule per balancer (a compilation each, which bounds the suite's time), chosen so that all
# 8 combinations of the three knobs occur, each softadapt variant and each scale meets both values
# of every knob, and the two conventions of a factory get complementary schedules.
S = Schedule
SCHEDULES: dict[str, Schedule] = {
    "softadapt-original-none": S(1, 1, False),
    "softadapt-original-log": S(2, 3, True),
    "softadapt-original-relative": S(1, 3, True),
    "softadapt-normalized-none": S(2, 1, True),
    "softadapt-normalized-log": S(1, 3, False),
    "softadapt-normalized-relative": S(2, 3, False),
    "softadapt-loss_weighted-none": S(1, 3, True),
    "softadapt-loss_weighted-log": S(2, 1, False),
    "softadapt-loss_weighted-relative": S(1, 1, True),
    "ratio-ratio": S(1, 1, True),
    "ratio-difference": S(2, 3, False),
    "relobralo-bischof": S(1, 3, True),
    "relobralo-physicsnemo": S(2, 1, False),
    "dwa": S(2, 1, True),
    "rlw": S(2, 3, False),
    "uncertainty-libmtl": S(2, 3, True),
    "uncertainty-physicsnemo": S(1, 1, False),
    "fixed": S(2, 3, True),
}
assert SCHEDULES.keys() == BALANCERS.keys()
assert set(SCHEDULES.values()) == set(itertools.starmap(S, itertools.product((1, 2), (1, 3), (False, True))))
BALANCER_CASES = [
    pytest.param(name, schedule, id=f"{name}-{schedule}") for name, schedule in SCHEDULES.items()
]


class StreamRun(NamedTuple):
    weights: np.ndarray  # [T, K], the weights returned after each step
    history_finite: np.ndarray  # [T] bool
    state_finite: np.ndarray  # [T] bool, every float leaf of the state
    count: int
    rejected: int


def _scan_balancer(balancer: sj.Balancer, stream: jax.Array) -> tuple[Any, ...]:
    def step(state: sj.BalancerState, losses: jax.Array) -> tuple[sj.BalancerState, tuple[Any, ...]]:
        weights, state = balancer.update(losses, state)
        return state, (weights, jnp.all(jnp.isfinite(state.history)), float_leaves_finite(state))

    final, (weights, history_finite, state_finite) = jax.lax.scan(step, balancer.init(), stream)
    return weights, history_finite, state_finite, final.count, final.rejected


@functools.cache
def jitted_streams() -> Callable[[np.ndarray], dict[str, tuple[Any, ...]]]:
    """Every balancer, under its schedule, scanned over one ``[T, K]`` stream: one jitted function
    (compiled together the programs cost a third of compiling them one by one)."""
    balancers = {name: factory(**SCHEDULES[name].kwargs) for name, factory in BALANCERS.items()}
    return jax.jit(lambda stream: {name: _scan_balancer(b, stream) for name, b in balancers.items()})


# One fixed seed for the three properties: every case of each draws the same streams, so each
# stream runs through all the balancers once (cached), however many cases and properties see it.
STREAM_SETTINGS = settings(FUZZ_SETTINGS, derandomize=False, max_examples=30)
STREAM_SEED = 15


@functools.lru_cache(maxsize=1024)
def _all_streams(stream_bytes: bytes) -> dict[str, tuple[Any, ...]]:
    stream = np.frombuffer(stream_bytes, np.float32).reshape(NUM_STEPS, NUM_LOSSES)
    return jax.device_get(jitted_streams()(stream))


def run_stream(name: str, stream: np.ndarray) -> StreamRun:
    w, hf, sf, count, rejected = _all_streams(np.ascontiguousarray(stream, np.float32).tobytes())[name]
    return StreamRun(np.asarray(w), np.asarray(hf), np.asarray(sf), int(count), int(rejected))


def nonfinite_steps(stream: np.ndarray, groups: tuple[int, ...] | None) -> np.ndarray:
    """``[T]`` bool: the steps whose losses (or, with groups, float32 group sums) are not all finite."""
    if groups is not None:
        ids = np.asarray(groups)
        with np.errstate(over="ignore", invalid="ignore"):
            # Two terms per group at most, so the float32 sum rounds as the library's segment sum.
            stream = np.stack(
                [stream[:, ids == g].sum(axis=1, dtype=np.float32) for g in range(ids.max() + 1)], 1
            )
    return ~np.all(np.isfinite(stream), axis=1)


def assert_weights_valid(weights: np.ndarray, num_losses: int) -> None:
    """Every weight the balancer returns is finite and >= 0, one per term (``[K]`` per step)."""
    assert weights.shape[1:] == (num_losses,), weights.shape
    bad = ~(np.isfinite(weights) & (weights >= 0))
    assert not bad.any(), (
        f"invalid weights at steps {np.nonzero(bad.any(axis=1))[0]}: {weights[bad.any(axis=1)]}"
    )


def assert_counts_exact(run: StreamRun, expected_rejected: np.ndarray) -> None:
    """``rejected`` counts exactly the non-finite steps and ``count`` every other step."""
    assert run.rejected == int(expected_rejected.sum()), (run.rejected, np.nonzero(expected_rejected)[0])
    assert run.count == expected_rejected.size - int(expected_rejected.sum()), (run.count, run.rejected)


def assert_state_finite(run: StreamRun) -> None:
    """The history, and every other float in the state, never holds a non-finite value."""
    assert run.history_finite.all(), f"non-finite history after steps {np.nonzero(~run.history_finite)[0]}"
    assert run.state_finite.all(), f"non-finite state after steps {np.nonzero(~run.state_finite)[0]}"


@pytest.mark.parametrize(("name", "schedule"), BALANCER_CASES)
@STREAM_SETTINGS
@seed(STREAM_SEED)
@given(stream=loss_streams(NUM_STEPS, NUM_LOSSES))
def test_balancer_weights_are_finite_nonnegative_of_shape_k(name: str, schedule: Schedule, stream) -> None:
    assert_weights_valid(run_stream(name, stream).weights, NUM_LOSSES)


@pytest.mark.parametrize(("name", "schedule"), BALANCER_CASES)
@STREAM_SETTINGS
@seed(STREAM_SEED)
@given(stream=loss_streams(NUM_STEPS, NUM_LOSSES))
def test_balancer_rejects_exactly_the_nonfinite_steps(name: str, schedule: Schedule, stream) -> None:
    run = run_stream(name, stream)
    assert_counts_exact(run, nonfinite_steps(stream, GROUPS if schedule.grouped else None))


@pytest.mark.parametrize(("name", "schedule"), BALANCER_CASES)
@STREAM_SETTINGS
@seed(STREAM_SEED)
@given(stream=loss_streams(NUM_STEPS, NUM_LOSSES))
def test_balancer_state_never_holds_a_nonfinite_value(name: str, schedule: Schedule, stream) -> None:
    assert_state_finite(run_stream(name, stream))


# ----------------------------------------------------------------------------- 2. softadapt_weights
HISTORY_STEPS = 5
EPS32 = float(np.finfo(np.float32).eps)
F32_TINY = float(np.finfo(np.float32).tiny)
VARIANTS = ("original", "normalized", "loss_weighted")
SCALES = ("none", "log", "relative")
# Below this no slope of a 5-step float32 history can overflow: the finite-difference coefficients
# of order 4 have an absolute sum of about 10.7 (and a column's sum of 5 values stays finite).
NO_OVERFLOW = F32_MAX / 64


@st.composite
def finite_histories(draw: st.DrawFn, max_value: float = F32_MAX) -> np.ndarray:
    """``[T, K]`` finite non-negative float32 histories: mixed, constant, all huge, all tiny or all zero."""
    kind = draw(st.sampled_from(("mixed", "constant", "huge", "tiny", "zero")))
    shape = (HISTORY_STEPS, NUM_LOSSES)
    if kind == "zero":
        return np.zeros(shape, np.float32)
    elements = {
        "huge": st.floats(float(np.float32(1e30)), F32_MAX, width=32),
        "tiny": st.floats(0.0, float(np.float32(1e-30)), width=32, allow_subnormal=True),
    }.get(kind, finite_losses())
    history = draw(hnp.arrays(np.float32, shape, elements=elements))
    history = np.minimum(history, np.float32(max_value))
    if kind == "constant":
        history = np.broadcast_to(history[:1], shape).copy()
    return history


temperatures = st.one_of(st.sampled_from((0.0, 0.1, -0.1, 1e30, -1e30)), st.floats(-1e3, 1e3, width=32))
cotangents = hnp.arrays(np.float32, (NUM_LOSSES,), elements=st.floats(-1.0, 1.0, width=32))


WEIGHT_CONFIGS = tuple((v, s, 1e-8) for v in VARIANTS for s in SCALES) + tuple(
    ("loss_weighted", s, 0.0) for s in SCALES
)
# The gradient in each variant and each scale (three pairs, not nine: a gradient compiles slowly).
GRADIENT_CONFIGS = (("original", "log"), ("normalized", "relative"), ("loss_weighted", "none"))


def eager_weights(history: Any, beta: Any, variant: str, scale: str, eps: float) -> jax.Array:
    return sj.softadapt_weights(history, beta, variant=variant, scale=scale, eps=eps)


@functools.cache
def jitted_weights() -> Callable[..., dict[tuple[Any, ...], jax.Array]]:
    """Every configuration's weights in one jitted function (one compilation: these programs are
    small, so compiling each separately would cost several times more)."""
    return jax.jit(lambda h, b: {c: eager_weights(h, b, *c) for c in WEIGHT_CONFIGS})


@functools.cache
def jitted_gradients() -> Callable[..., dict[tuple[str, str], Any]]:
    """The gradient of ``<cotangent, w(history, beta)>`` in (history, beta), per gradient configuration."""

    def grads(h: jax.Array, b: jax.Array, c: jax.Array) -> dict[tuple[str, str], Any]:
        return {
            (v, s): jax.grad(lambda h, b, v=v, s=s: jnp.vdot(c, eager_weights(h, b, v, s, 1e-8)), (0, 1))(
                h, b
            )
            for v, s in GRADIENT_CONFIGS
        }

    return jax.jit(grads)


def weight_cases() -> list[Any]:
    """Every variant x scale (default eps), and loss_weighted with eps=0."""
    return [
        pytest.param(v, s, e, id=f"{v}-{s}" + ("-eps0" if e == 0.0 else "")) for v, s, e in WEIGHT_CONFIGS
    ]


def assert_on_simplex(w: np.ndarray, *, exact: bool) -> None:
    """Finite, non-negative, summing to at most 1; to 1 within float32 rounding when ``exact``.

    softadapt_weights promises weights "summing to 1 (up to the original's eps)": the stabiliser
    eps is added to the denominator, so the sum is ``S / (S + eps')`` <= 1. Without a prior
    (original, normalized) ``S >= 1`` and ``eps' <= eps``, so the sum is 1 to within 1e-8; the
    loss-weighted prior (the mean losses) can make ``S`` as small as the losses, so only
    ``eps=0`` gives the exact simplex.
    """
    w = np.asarray(w, np.float64)
    assert w.shape == (NUM_LOSSES,), w.shape
    assert np.all(np.isfinite(w)) and np.all(w >= 0), w
    total = float(np.sum(w))
    if exact:
        assert abs(total - 1.0) <= 1e-5, (total, w)
    else:
        assert 0.0 <= total <= 1.0 + 1e-5, (total, w)


def _slope_inputs(history: np.ndarray, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """The values whose slopes are taken (float64) and the divisor of relative slopes."""
    h = history.astype(np.float64)
    if scale == "log":
        return np.log(np.where(h > F32_TINY, h, F32_TINY)), np.ones(h.shape[1])
    if scale == "relative":
        mean = h.mean(axis=0)
        return h, np.abs(np.where(mean == 0, 1.0, mean))
    return h, np.ones(h.shape[1])


def rounding_rtol(history: np.ndarray, beta: float, variant: str, scale: str) -> float:
    """The relative difference rounding alone allows between two evaluations of the weights.

    jit and eager may round the slopes differently (fused multiply-adds), each by at most
    ``16 eps sum_j |c_j| |x_j - x_last|`` (plus the rounding of the logs); a softmax input off by
    ``dz`` changes a weight by a relative ``2 |dz|`` at most; the loss-weighted prior adds the
    rounding of its logarithm to ``dz``. Returns inf where the normalized variant's slope sum is
    not resolved by that rounding (its sign is rounding noise).
    """
    x, divisor = _slope_inputs(history, scale)
    coeffs = np.asarray([float(c) for c in sj.finite_difference_coefficients(HISTORY_STEPS - 1)])
    spread = np.abs(coeffs) @ np.abs(x - x[-1])
    if scale == "log":
        spread = spread + np.abs(coeffs) @ np.abs(x)
    delta = 16 * EPS32 * spread / divisor
    slopes = (coeffs @ (x - x[-1])) / divisor
    if variant == "normalized":
        denom, ddenom = np.sum(slopes), np.sum(delta) + 4 * EPS32 * np.sum(np.abs(slopes))
        if not abs(denom) > 2 * ddenom:
            return np.inf
        dz = abs(beta) * np.max(delta / abs(denom) + np.abs(slopes) * ddenom / denom**2)
    else:
        dz = abs(beta) * np.max(delta)
    if variant == "loss_weighted":
        # The prior enters the exponent as log(mean), rounded relative to its magnitude.
        means = history.astype(np.float64).mean(axis=0)
        dz += 8 * EPS32 * np.max(np.abs(np.log(means[means > 0])), initial=0.0)
    return 1e-5 + 4 * dz


def assert_jit_matches_eager(history: np.ndarray, beta: float, variant: str, scale: str, eps: float) -> None:
    """The jitted weights equal the eager ones to rounding, and exactly on a constant history."""
    w_jit = np.asarray(jitted_weights()(history, np.float32(beta))[variant, scale, eps])
    w_eager = np.asarray(eager_weights(history, np.float32(beta), variant, scale, eps))
    rtol = rounding_rtol(history, beta, variant, scale)
    if np.isfinite(rtol):
        # atol: a few float32 ulps of the weights' sum (1).
        np.testing.assert_allclose(w_jit, w_eager, rtol=rtol, atol=1e-6)
    if variant != "loss_weighted" and np.all(history == history[:1]):
        # A constant history has slopes of exactly 0 both ways: exactly uniform weights.
        np.testing.assert_array_equal(w_jit, w_eager)
        np.testing.assert_array_equal(w_jit, np.full(NUM_LOSSES, w_jit[0]))


def assert_finite_gradients(
    history: np.ndarray, beta: float, cotangent: np.ndarray, variant: str, scale: str
) -> None:
    """The gradient of ``<cotangent, w>`` in the history and in beta is finite."""
    grad_history, grad_beta = jitted_gradients()(history, np.float32(beta), cotangent)[variant, scale]
    assert np.all(np.isfinite(grad_history)), grad_history
    assert np.isfinite(grad_beta), grad_beta


# Minimal failing inputs this suite found (hypothesis' shrunk examples) for defects since fixed:
# slopes of huge finite losses that overflowed (jit and eager differently, gradients nan), and a
# normalized slope sum of 1e-38 whose square underflowed in the backward pass. Kept as explicit
# examples, so that every run tries them first.
_X1, _X2, _X3 = np.float32(1.1342746e38), np.float32(1.6333554e38), np.float32(2.0**126)
OVERFLOWING_HISTORY = np.array(
    [[0, 0, _X1], [_X1, _X1, _X1], [_X1, _X1, _X1], [_X1, _X1, _X1], [0, _X1, _X1]], np.float32
)
OVERFLOWING_SLOPE = np.array([[0, _X2, _X2]] + [[_X2, _X2, _X2]] * 4, np.float32)
OVERFLOWING_RELATIVE = np.array([[_X3] * 3, [_X3] * 3, [_X3, _X3, 0], [_X3] * 3, [_X3, _X3, 0]], np.float32)
TINY_SLOPE_SUM = np.array([[0, F32_TINY, F32_TINY]] + [[F32_TINY] * 3] * 4, np.float32)
NO_COTANGENT = np.zeros(NUM_LOSSES, np.float32)


@pytest.mark.parametrize(("variant", "scale", "eps"), weight_cases())
@FUZZ_SETTINGS
@given(history=finite_histories(), beta=temperatures)
def test_weights_are_on_the_simplex(variant: str, scale: str, eps: float, history, beta) -> None:
    w = jitted_weights()(history, np.float32(beta))[variant, scale, eps]
    assert_on_simplex(w, exact=variant != "loss_weighted" or eps == 0.0)


@pytest.mark.parametrize(("variant", "scale", "eps"), weight_cases())
@EAGER_SETTINGS
@given(history=finite_histories(max_value=NO_OVERFLOW), beta=temperatures)
def test_weights_under_jit_match_eager_below_overflow(
    variant: str, scale: str, eps: float, history, beta
) -> None:
    assert_jit_matches_eager(history, beta, variant, scale, eps)


@pytest.mark.parametrize(("variant", "scale", "eps"), weight_cases())
@EAGER_SETTINGS
@example(history=OVERFLOWING_HISTORY, beta=0.1)
@example(history=OVERFLOWING_RELATIVE, beta=0.1)
@given(history=finite_histories(), beta=temperatures)
def test_weights_under_jit_match_eager(variant: str, scale: str, eps: float, history, beta) -> None:
    assert_jit_matches_eager(history, beta, variant, scale, eps)


GRADIENT_CASES = [pytest.param(v, s, id=f"{v}-{s}") for v, s in GRADIENT_CONFIGS]


@pytest.mark.parametrize(("variant", "scale"), GRADIENT_CASES)
@FUZZ_SETTINGS
@example(history=TINY_SLOPE_SUM, beta=0.0, cotangent=NO_COTANGENT)
@given(
    history=finite_histories(max_value=NO_OVERFLOW),
    beta=st.floats(-10.0, 10.0, width=32),
    cotangent=cotangents,
)
def test_weights_have_finite_gradients_below_overflow(variant, scale, history, beta, cotangent) -> None:
    assert_finite_gradients(history, beta, cotangent, variant, scale)


@pytest.mark.parametrize(("variant", "scale"), GRADIENT_CASES)
@FUZZ_SETTINGS
@example(history=OVERFLOWING_SLOPE, beta=0.0, cotangent=NO_COTANGENT)
@given(history=finite_histories(), beta=st.floats(-10.0, 10.0, width=32), cotangent=cotangents)
def test_weights_have_finite_gradients(variant, scale, history, beta, cotangent) -> None:
    assert_finite_gradients(history, beta, cotangent, variant, scale)


# ----------------------------------------------------------------------------- 3. stable_softmax
SOFTMAX_SIZE = 4
ANY_FLOAT32 = st.one_of(
    st.sampled_from(SPECIAL_VALUES + NON_FINITE + tuple(-v for v in SPECIAL_VALUES)),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)
softmax_scores = hnp.arrays(np.float32, (SOFTMAX_SIZE,), elements=ANY_FLOAT32)
softmax_priors = hnp.arrays(
    np.float32,
    (SOFTMAX_SIZE,),
    elements=st.one_of(st.sampled_from((0.0, np.inf, np.nan, -1.0, 1.0)), ANY_FLOAT32),
)
softmax_temperatures = st.one_of(
    st.sampled_from((0.0, -1.0, 1e30, -1e30, F32_MAX, -F32_MAX)), st.floats(width=32)
)


@functools.cache
def jitted_softmax() -> Callable[..., dict[tuple[bool, float], jax.Array]]:
    """stable_softmax with and without a prior, at the original's eps and at 0, in one jitted function."""

    def softmax(x: jax.Array, beta: jax.Array, prior: jax.Array) -> dict[tuple[bool, float], jax.Array]:
        return {
            (with_prior, eps): sj.stable_softmax(x, beta, prior if with_prior else None, eps=eps)
            for with_prior in (False, True)
            for eps in (1e-8, 0.0)
        }

    return jax.jit(softmax)


def assert_softmax_valid(w: np.ndarray, prior: np.ndarray | None, eps: float) -> None:
    """Finite, >= 0, summing to at most 1 (to 1 with eps=0); no weight where the prior is 0, < 0 or nan.

    stable_softmax promises "non-negative weights summing to at most 1" for any input, counts
    negative or nan priors as 0, and is uniform when nothing has mass (all priors 0 with eps=0).
    """
    w = np.asarray(w, np.float64)
    assert w.shape == (SOFTMAX_SIZE,), w.shape
    assert np.all(np.isfinite(w)) and np.all(w >= 0), w
    total = float(np.sum(w))
    assert total <= 1.0 + 1e-5, (total, w)
    if eps == 0.0:
        assert abs(total - 1.0) <= 1e-5, (total, w)
    if prior is not None:
        massless = ~(prior > 0)  # 0, negative or nan
        # Subnormal priors may be flushed to 0 (XLA on CPU does): they decide nothing here.
        if np.any(prior >= F32_TINY):
            assert np.all(w[massless] == 0), (w, prior)


SOFTMAX_CASES = [
    pytest.param(False, 1e-8, id="no-prior-eps"),
    pytest.param(False, 0.0, id="no-prior-eps0"),
    pytest.param(True, 1e-8, id="prior-eps"),
    pytest.param(True, 0.0, id="prior-eps0"),
]


@pytest.mark.parametrize(("with_prior", "eps"), SOFTMAX_CASES)
@FUZZ_SETTINGS
@example(x=np.array([1, 0, 0, 0], np.float32), beta=100.0, prior=np.array([0, 1, 1, 1], np.float32))
@given(x=softmax_scores, beta=softmax_temperatures, prior=softmax_priors)
def test_stable_softmax_is_finite_nonnegative_and_sums_to_at_most_one(
    with_prior, eps, x, beta, prior
) -> None:
    w = jitted_softmax()(x, np.float32(beta), prior)[with_prior, eps]
    assert_softmax_valid(w, prior if with_prior else None, eps)


# ----------------------------------------------------------------------------- 4. optax chain and train step
TRAIN_STEPS, TRAIN_LOSSES = 8, 2
TARGETS = np.array([[1.0, -2.0, 0.5], [-1.0, 3.0, 0.0]], np.float32)  # [K, P]: the minimiser of each loss


@st.composite
def poisons(draw: st.DrawFn, num_steps: int = TRAIN_STEPS) -> np.ndarray:
    """``[T, K]`` factors of the losses: 1, or at a random subset of steps nan, inf or -inf in some terms."""
    poison = np.ones((num_steps, TRAIN_LOSSES), np.float32)
    for step in draw(st.lists(st.integers(0, num_steps - 1), max_size=num_steps // 2, unique=True)):
        columns = draw(st.lists(st.integers(0, TRAIN_LOSSES - 1), min_size=1, unique=True))
        poison[step, columns] = draw(st.sampled_from(NON_FINITE))
    return poison


def quadratic_losses(params: dict[str, jax.Array], poison: jax.Array) -> jax.Array:
    """``[K]`` losses ``||w - t_k||^2``, times the poison: a non-finite loss arising in the computation."""
    return jnp.sum((params["w"][None] - TARGETS) ** 2, axis=1) * poison


# The documented optax-only recipe (softadapt_jax.guard): sj.guard.apply_if_finite outermost (optax's
# own cannot trace around per_component=True, whose output is not shaped like its input), so that a step
# with a non-finite gradient leaves the parameters, Adam's moments and the balancer's state as they were.
OPTAX_TRANSFORMS: dict[str, tuple[Callable[[], Any], bool]] = {
    "softadapt": (lambda: sj.softadapt(0.1, num_losses=TRAIN_LOSSES, window=3), False),
    "balance-relobralo": (lambda: sj.balance(sj.relobralo_balancer(num_losses=TRAIN_LOSSES)), False),
    "balance-relobralo-per-component": (
        lambda: sj.balance(sj.relobralo_balancer(num_losses=TRAIN_LOSSES), per_component=True),
        True,
    ),
}


@functools.cache
def jitted_optax_run(name: str) -> Callable[[np.ndarray], tuple[Any, ...]]:
    """One transform in ``apply_if_finite(chain(transform, adam))``, a hand-written step, scanned."""
    make, per_component = OPTAX_TRANSFORMS[name]
    tx = sj.guard.apply_if_finite(optax.chain(make(), optax.adam(1e-1)))

    def step(carry: tuple[Any, Any], poison: jax.Array) -> tuple[tuple[Any, Any], tuple[Any, ...]]:
        params, opt_state = carry
        if per_component:
            losses = quadratic_losses(params, poison)
            grads = jax.jacrev(quadratic_losses)(params, poison)  # stacked [K, ...]
        else:
            weights = sj.get_weights(opt_state)

            def total(q: Any) -> tuple[jax.Array, jax.Array]:
                losses = quadratic_losses(q, poison)
                return jnp.vdot(weights, losses), losses

            (_, losses), grads = jax.value_and_grad(total, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
        new_params = optax.apply_updates(params, updates)
        return (new_params, opt_state), (new_params["w"], params["w"])

    def run(poison: jax.Array) -> tuple[Any, ...]:
        params = {"w": jnp.zeros(TARGETS.shape[1], jnp.float32)}
        (_, opt_state), (after, before) = jax.lax.scan(step, (params, tx.init(params)), poison)
        balancer_state = sj.find_balancer_states(opt_state)[0]
        return after, before, balancer_state.count, balancer_state.rejected, opt_state.total_notfinite

    return jax.jit(run)


def assert_guarded_run(after: np.ndarray, before: np.ndarray, bad: np.ndarray) -> None:
    """Parameters stay finite at every step, and a non-finite step leaves them exactly as they were."""
    assert np.all(np.isfinite(after)), (
        f"non-finite parameters after steps {np.nonzero(~np.isfinite(after).all(1))[0]}"
    )
    np.testing.assert_array_equal(after[bad], before[bad])


@pytest.mark.parametrize(
    "name",
    list(OPTAX_TRANSFORMS),
)
@FUZZ_SETTINGS
@example(poison=np.ones((TRAIN_STEPS, TRAIN_LOSSES), np.float32))  # the per-component case fails on any
@given(poison=poisons())
def test_optax_chain_with_apply_if_finite_keeps_parameters_finite(name: str, poison) -> None:
    after, before, count, rejected, skipped = jax.device_get(jitted_optax_run(name)(poison))
    bad = ~np.all(np.isfinite(poison), axis=1)
    assert_guarded_run(np.asarray(after), np.asarray(before), bad)
    # apply_if_finite keeps the whole inner state, the balancer's included: the balancer never saw
    # the skipped steps, and apply_if_finite counted them.
    assert (
        int(skipped) == int(bad.sum()) and int(count) == TRAIN_STEPS - int(bad.sum()) and int(rejected) == 0
    )


class GuardedNet(nnx.Module):
    """A small model with both kinds of NNX state a step must keep: BatchNorm statistics and dropout RNG."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.dense1 = nnx.Linear(3, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.dense2 = nnx.Linear(8, TRAIN_LOSSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense2(self.drop(nnx.relu(self.norm(self.dense1(x)))))


def nnx_losses(model: GuardedNet, batch: dict[str, jax.Array]) -> jax.Array:
    y = model(batch["x"])
    return (
        jnp.stack([jnp.mean((y[:, 0] - batch["y"]) ** 2), jnp.mean((y[:, 1] + batch["y"]) ** 2)])
        * batch["poison"]
    )


NNX_BATCHES = [
    {
        "x": np.asarray(jax.random.normal(jax.random.PRNGKey(i), (16, 3))),
        "y": np.linspace(-1.0, 1.0, 16, dtype=np.float32),
    }
    for i in range(TRAIN_STEPS)
]


@functools.cache
def nnx_step() -> Callable[..., dict[str, jax.Array]]:
    return nnx.jit(make_nnx_train_step(nnx_losses))


@functools.cache
def nnx_initial() -> tuple[Any, Any]:
    """The graph and pure state of a fresh model and optimizer: every example merges a copy of the
    same one, so the jitted step compiles once (a new model would compile anew)."""
    model = GuardedNet(nnx.Rngs(0, dropout=1))
    tx = optax.chain(sj.softadapt(0.1, num_losses=TRAIN_LOSSES, window=3), optax.adam(1e-1))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    return graphdef, nnx.as_pure(state)


def state_values(tree: Any) -> dict[str, np.ndarray]:
    """The leaves of an NNX object's state by key path, as NumPy arrays (PRNG keys as their key data)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(tree)))
    return {
        jax.tree_util.keystr(path): np.asarray(
            jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for path, x in leaves
    }


def assert_unchanged(after: dict[str, np.ndarray], before: dict[str, np.ndarray], skip: str = "") -> None:
    """Every leaf bit-identical (but those whose path contains ``skip``, when given)."""
    assert after.keys() == before.keys()
    for path, value in after.items():
        if not (skip and skip in path):
            np.testing.assert_array_equal(value, before[path], err_msg=path)


@settings(FUZZ_SETTINGS, max_examples=8)
@given(poison=poisons())
def test_guarded_nnx_step_keeps_parameters_finite(poison) -> None:
    model, optimizer = nnx.merge(*nnx_initial())
    step = nnx_step()
    for batch, p in zip(NNX_BATCHES, poison, strict=True):
        bad = not np.all(np.isfinite(p))
        before = (state_values(model), state_values(optimizer)) if bad else None
        metrics = step(model, optimizer, {**batch, "poison": p})
        assert bool(metrics["skipped"]) == bad
        for leaf in jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param))):
            assert np.all(np.isfinite(leaf))
        if bad:
            # Parameters, BatchNorm statistics, RNG state and the optimizer: all as they were,
            # but for the balancer's rejected count.
            assert_unchanged(state_values(model), before[0])
            assert_unchanged(state_values(optimizer), before[1], skip="rejected")
    balancer_state = sj.find_balancer_states(nnx.as_pure(optimizer.opt_state))[0]
    bad_steps = int(np.sum(~np.all(np.isfinite(poison), axis=1)))
    assert int(balancer_state.rejected) == bad_steps and int(balancer_state.count) == TRAIN_STEPS - bad_steps


# ----------------------------------------------------------------------------- 5. gradient-level combiners
GRAD_K, GRAD_P = 3, 4
# Row norms from 0 to beyond 1.8e19, where a float32 Gramian entry (a squared norm) overflows.
ROW_SCALES = (0.0, 1e-30, 1e-10, 1.0, 1e10, 1e18, 1e19, 1e20, 1e30, 1e37)
GRAMIAN_SAFE = 1e18  # below this every Gramian entry of these gradients is finite in float32


@st.composite
def gradient_matrices(draw: st.DrawFn, max_scale: float = max(ROW_SCALES)) -> np.ndarray:
    """``[K, P]`` float32 per-component gradients: rows of any scale (zero included), maybe duplicated."""
    directions = draw(hnp.arrays(np.float32, (GRAD_K, GRAD_P), elements=st.floats(-1.0, 1.0, width=32)))
    scales = draw(
        st.lists(st.sampled_from([s for s in ROW_SCALES if s <= max_scale]), min_size=GRAD_K, max_size=GRAD_K)
    )
    grads = (directions * np.asarray(scales, np.float32)[:, None]).astype(np.float32)
    for target, source in draw(
        st.lists(st.tuples(st.integers(0, GRAD_K - 1), st.integers(0, GRAD_K - 1)), max_size=2)
    ):
        grads[target] = grads[source]  # duplicates (or, with a zero row, more zero rows)
    return grads


_ORDERS = np.asarray(sj.gradients.aggregators.pcgrad._random_orders(jax.random.PRNGKey(0), GRAD_K))
GRAMIAN_RULES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "mgda-libmtl": lambda g: sj.mgda_weights(g, convention="libmtl"),
    "mgda-torchjd": lambda g: sj.mgda_weights(g, convention="torchjd"),
    "mgda-exact": lambda g: sj.mgda_weights(g, convention="exact"),
    "pcgrad-libmtl": lambda g: sj.pcgrad_weights(g, _ORDERS, convention="libmtl"),
    "pcgrad-torchjd": lambda g: sj.pcgrad_weights(g, _ORDERS, convention="torchjd"),
    "cagrad-libmtl": lambda g: sj.cagrad_weights(g, 0.5, convention="libmtl"),
    "cagrad-torchjd": lambda g: sj.cagrad_weights(g, 0.5, convention="torchjd"),
}


@functools.cache
def jitted_gramian_rules() -> Callable[[np.ndarray], tuple[jax.Array, dict[str, jax.Array]]]:
    """The library's Gramian of the stacked gradients, and every weight rule on it (one jitted function).

    The scaled Gramian (``scaled=True``), as the combiners use it: the plain one of gradients whose
    largest entry is in ``[2**-33, 2**32)``, bit for bit, and outside that range the Gramian of the
    gradients brought into it, so that it neither overflows nor underflows to 0 (where no rule
    could tell zero gradients from tiny ones).
    """

    def rules(grads: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        gram, _ = sj.stacked_gramian({"w": grads}, scaled=True)
        return gram, {name: rule(gram) for name, rule in GRAMIAN_RULES.items()}

    return jax.jit(rules)


def min_norm_sq(grads: np.ndarray) -> float:
    """``min_{w in simplex} ||w @ grads||^2`` in float64, exactly: the best face of the simplex.

    On each face (subset S of the components) the minimiser over the affine hull solves the KKT
    system ``[G_SS 1; 1^T 0]``; the optimum is the smallest value among the faces whose solution
    is non-negative (the vertices always are, so there is one).
    """
    g = grads.astype(np.float64)
    g = g / max(np.max(np.abs(g)), 1e-300)  # scale-free; undone below
    scale = np.max(np.abs(grads.astype(np.float64))) ** 2
    gram, best = g @ g.T, np.inf
    for size in range(1, GRAD_K + 1):
        for face in itertools.combinations(range(GRAD_K), size):
            idx = list(face)
            kkt = np.block(
                [[gram[np.ix_(idx, idx)], np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]]
            )
            w = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=None)[0][:size]
            if np.all(w >= -1e-12):
                w = np.maximum(w, 0) / np.sum(np.maximum(w, 0))
                best = min(best, float(np.sum((w @ g[idx]) ** 2)))
    return best * scale


def assert_min_norm(direction: np.ndarray, grads: np.ndarray) -> None:
    """``||direction||^2`` is the simplex's minimum to 1e-5 of the largest squared norm (the exact
    solver stops at a duality gap of 1e-6 on that scale)."""
    sq = np.sum(grads.astype(np.float64) ** 2, axis=1)
    assert np.sum(np.asarray(direction, np.float64) ** 2) <= min_norm_sq(grads) + 1e-5 * np.max(sq), (
        direction,
        sq,
    )


def assert_rule_valid(name: str, coefficients: np.ndarray, grads: np.ndarray) -> None:
    """Finite coefficients, one per component; MGDA's on the simplex, the exact one of minimal norm."""
    c = np.asarray(coefficients, np.float64)
    assert c.shape == (GRAD_K,), c.shape
    assert np.all(np.isfinite(c)), (name, c)
    if name.startswith("mgda"):
        assert np.all(c >= 0) and abs(np.sum(c) - 1.0) <= 1e-5, (name, c)
    if name == "mgda-exact":
        assert_min_norm(c @ grads.astype(np.float64), grads)


# Minimal failing inputs this suite found for defects since fixed (explicit examples, as above): LibMTL's
# MGDA left the simplex on a Gramian of 1e10 * I in float32 (its projection rounded the unit sum away),
# the Gramian of gradients below 1e-19 underflowed to 0 (exact MGDA returned uniform weights), and the
# floor of the l2 normalisers squared to a subnormal flushed to 0 (0/0 for a zero gradient).
MODERATE_GRADIENTS = np.eye(GRAD_K, GRAD_P, dtype=np.float32) * np.float32(1e5)  # Gramian 1e10 * I
TINY_GRADIENTS = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1e-30] * 4], np.float32)
ZERO_ROW_GRADIENTS = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32)


@pytest.mark.parametrize("name", GRAMIAN_RULES)
@FUZZ_SETTINGS
@example(grads=MODERATE_GRADIENTS)
@example(grads=TINY_GRADIENTS)
@given(grads=gradient_matrices(max_scale=GRAMIAN_SAFE))
def test_gramian_weight_rules_are_finite_below_gramian_overflow(name: str, grads) -> None:
    _, coefficients = jitted_gramian_rules()(grads)
    assert_rule_valid(name, coefficients[name], grads)


COMBINERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "mgda": lambda: sj.mgda(),
    "mgda-exact": lambda: sj.mgda(convention="exact"),
    "mgda-l2": lambda: sj.mgda(normalization="l2"),
    "pcgrad": lambda: sj.pcgrad(seed=0),
    "cagrad": lambda: sj.cagrad(),
    "cagrad-torchjd": lambda: sj.cagrad(convention="torchjd"),
}


@functools.cache
def jitted_combiners() -> Callable[[np.ndarray], dict[str, jax.Array]]:
    """Every combiner's update of one set of stacked gradients (one jitted function)."""
    params = {"w": jnp.zeros(GRAD_P, jnp.float32)}

    def combine(grads: jax.Array) -> dict[str, jax.Array]:
        out = {}
        for name, make in COMBINERS.items():
            tx = make()
            updates, _ = tx.update({"w": grads}, tx.init(params), params)
            out[name] = updates["w"]
        return out

    return jax.jit(combine)


def assert_direction_valid(name: str, direction: np.ndarray, grads: np.ndarray) -> None:
    """A finite update of the parameters' shape; the exact MGDA's of minimal norm."""
    d = np.asarray(direction, np.float64)
    assert d.shape == (GRAD_P,), d.shape
    assert np.all(np.isfinite(d)), (name, d)
    if name == "mgda-exact":
        assert_min_norm(d, grads)


HUGE_GRADIENTS = np.array([[1e20, 0, 0, 0], [0, 1e20, 0, 0], [0, 0, 1e20, 0]], np.float32)


@pytest.mark.parametrize("name", COMBINERS)
@FUZZ_SETTINGS
@example(grads=HUGE_GRADIENTS)
@example(grads=TINY_GRADIENTS)
@example(grads=ZERO_ROW_GRADIENTS)
@given(grads=gradient_matrices())
def test_combiners_give_finite_updates_for_gradients_of_any_norm(name: str, grads) -> None:
    assert_direction_valid(name, jitted_combiners()(grads)[name], grads)


GRADNORM_STEPS = 8
GRADNORM_CONVENTIONS = ("libmtl", "physicsnemo", "paper")


def assert_gradnorm_run(convention: str, grads: np.ndarray, losses: np.ndarray) -> None:
    """Weights finite, >= 0 and summing to K at every step; the state finite; ``rejected`` exact.

    >= 0, not > 0: K softmax(p) is positive in exact arithmetic, but a step as large as SGD's on
    huge gradient norms (LibMTL's optimizer) can push one exponent below the float32 range.
    """
    weights, _, state_finite, rejected = jax.device_get(jitted_gradnorm()(grads, losses)[convention])
    weights = np.asarray(weights, np.float64)
    assert np.all(np.isfinite(weights)) and np.all(weights >= 0), weights
    np.testing.assert_allclose(weights.sum(axis=1), GRAD_K, rtol=1e-5)
    assert np.all(state_finite), f"non-finite state after steps {np.nonzero(~np.asarray(state_finite))[0]}"
    bad = ~(np.all(np.isfinite(losses), axis=1) & np.all(np.isfinite(grads), axis=(1, 2)))
    assert int(rejected) == int(bad.sum()), (int(rejected), np.nonzero(bad)[0])


MODERATE_LOSSES = st.one_of(
    st.just(0.0), st.floats(float(np.float32(1e-10)), float(np.float32(1e10)), width=32)
)


@st.composite
def gradnorm_streams(
    draw: st.DrawFn, max_scale: float = max(ROW_SCALES), losses: st.SearchStrategy[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``([T, K, P] gradients, [T, K] losses)``: rows of any scale, non-finite entries at some steps."""
    directions = draw(
        hnp.arrays(np.float32, (GRADNORM_STEPS, GRAD_K, GRAD_P), elements=st.floats(-1.0, 1.0, width=32))
    )
    row_scales = st.sampled_from([s for s in ROW_SCALES if s <= max_scale])
    scales = draw(hnp.arrays(np.float32, (GRADNORM_STEPS, GRAD_K), elements=row_scales))
    grads = (directions * scales[..., None]).astype(np.float32)
    losses = draw(
        hnp.arrays(
            np.float32, (GRADNORM_STEPS, GRAD_K), elements=finite_losses() if losses is None else losses
        )
    )
    for step in draw(st.lists(st.integers(0, GRADNORM_STEPS - 1), max_size=3, unique=True)):
        value = draw(st.sampled_from(NON_FINITE))
        if draw(st.booleans()):
            losses[step, draw(st.integers(0, GRAD_K - 1))] = value
        else:
            grads[step, draw(st.integers(0, GRAD_K - 1)), draw(st.integers(0, GRAD_P - 1))] = value
    return grads, losses


@functools.cache
def jitted_gradnorm() -> Callable[..., dict[str, tuple[Any, ...]]]:
    """GradNorm in each convention, scanned over a stream of stacked gradients and losses."""
    params = {"w": jnp.zeros(GRAD_P, jnp.float32)}

    def run_one(convention: str, grads: jax.Array, losses: jax.Array) -> tuple[Any, ...]:
        tx = sj.gradnorm(num_losses=GRAD_K, layer=lambda tree: tree, convention=convention)

        def step(state: Any, inputs: tuple[jax.Array, jax.Array]) -> tuple[Any, tuple[Any, ...]]:
            g, step_losses = inputs
            updates, state = tx.update({"w": g}, state, params, losses=step_losses)
            return state, (sj.gradnorm_weights(state), updates["w"], float_leaves_finite(state))

        final, (weights, updates, state_finite) = jax.lax.scan(step, tx.init(params), (grads, losses))
        return weights, updates, state_finite, final.rejected

    return jax.jit(lambda g, losses: {c: run_one(c, g, losses) for c in GRADNORM_CONVENTIONS})


# Minimal failing inputs this suite found for defects since fixed (explicit examples, as above): a loss
# whose ratio to L(0) overflowed made the weights nan for good; gradient norms of 2e19 overflowed Adam's
# second moment.
RATIO_OVERFLOW_STREAM = (
    np.zeros((GRADNORM_STEPS, GRAD_K, GRAD_P), np.float32),
    np.where(
        np.arange(GRADNORM_STEPS * GRAD_K).reshape(GRADNORM_STEPS, GRAD_K) == GRAD_K, 1e20, F32_TINY
    ).astype(np.float32),
)
HUGE_NORM_STREAM = (
    np.full((GRADNORM_STEPS, GRAD_K, GRAD_P), 1e19, np.float32),
    np.zeros((GRADNORM_STEPS, GRAD_K), np.float32),
)


@pytest.mark.parametrize("convention", GRADNORM_CONVENTIONS)
@FUZZ_SETTINGS
@example(stream=RATIO_OVERFLOW_STREAM)
@example(stream=HUGE_NORM_STREAM)
@given(stream=gradnorm_streams())
def test_gradnorm_weights_stay_finite_and_count_the_rejected_steps(convention: str, stream) -> None:
    assert_gradnorm_run(convention, *stream)


@pytest.mark.parametrize("convention", GRADNORM_CONVENTIONS)
@FUZZ_SETTINGS
@given(stream=gradnorm_streams(max_scale=GRAMIAN_SAFE, losses=MODERATE_LOSSES))
def test_gradnorm_weights_stay_finite_and_count_the_rejected_steps_below_overflow(
    convention: str, stream
) -> None:
    """Norms below 1e18 and losses 0 or within 1e-10..1e10 (no ratio to L(0) can overflow)."""
    assert_gradnorm_run(convention, *stream)
