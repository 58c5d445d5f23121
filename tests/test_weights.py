"""Tests of the SoftAdapt weight functions (:mod:`softadapt_jax.weights`).

Property tests (hypothesis) draw histories whose values span 1e-8..1e8 and temperatures in
[-50, 50], for every variant and option. Tolerances of the float64 comparisons are derived from a
bound on the rounding error of the slopes, amplified by beta (and by the normalization): the
softmax is exponentially sensitive to its inputs, so a fixed tolerance would be either meaningless
or flaky.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import pathlib

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from softadapt_jax import SoftAdaptOptions, finite_difference_coefficients, rates_of_change, softadapt_weights

VARIANTS = ("original", "normalized", "loss_weighted")
EPS64 = float(np.finfo(np.float64).eps)
ROOT = pathlib.Path(__file__).resolve().parents[1]

PROPERTY_SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


# ----------------------------------------------------------------------------- strategies
@st.composite
def histories(draw, min_components: int = 1) -> np.ndarray:
    """``[T, K]`` float64 histories with values log-uniform in 1e-8..1e8.

    A few shapes only (each new shape compiles JAX's eager operations anew); hypothesis varies the
    values, the order, beta, the variant and the options.
    """
    num_steps = draw(st.sampled_from([2, 5]))
    num_components = draw(st.sampled_from([k for k in (1, 3) if k >= min_components]))
    exponents = draw(
        hnp.arrays(np.float64, (num_steps, num_components), elements=st.floats(-8.0, 8.0, width=32))
    )
    return 10.0**exponents


@st.composite
def configurations(draw, variants=VARIANTS, min_components: int = 1):
    """(history, beta, variant, accuracy_order, options)."""
    history = draw(histories(min_components=min_components))
    num_steps = history.shape[0]
    beta = draw(st.floats(-50.0, 50.0, width=32))
    variant = draw(st.sampled_from(variants))
    order = draw(st.one_of(st.none(), st.integers(1, num_steps - 1)))
    options = {
        "stencil": draw(st.sampled_from(["forward", "backward"])),
        "scale": draw(st.sampled_from(["none", "log", "relative"])),
        "normalization": draw(st.sampled_from(["sum", "l1"])),
    }
    return history, beta, variant, order, options


# ----------------------------------------------------------------------------- helpers
def _transformed(history: np.ndarray, scale: str) -> np.ndarray:
    if scale == "log":
        return np.log(history)
    if scale == "relative":
        return history / history.mean(axis=0)
    return history


def slope_error_bound(history: np.ndarray, order: int | None, stencil: str, scale: str) -> np.ndarray:
    """A conservative bound on the float64 rounding error of each slope: 16 eps sum_j |c_j| |L_j|."""
    h = _transformed(history, scale)
    n = h.shape[0] - 1 if order is None else order
    coeffs = np.abs([float(c) for c in finite_difference_coefficients(n, stencil)])
    return 16 * EPS64 * (coeffs @ np.abs(h[h.shape[0] - n - 1 :]))


def weights_rtol(history, beta, variant, order, options, delta=None) -> float:
    """Relative tolerance of float64 weights whose slopes may be off by ``delta`` (default: rounding).

    A softmax input off by dz changes each weight by a relative 2 |dz| at most. Returns inf when
    the normalized variant's denominator is not resolved by the perturbation (nothing to compare).
    """
    stencil, scale = options.get("stencil", "forward"), options.get("scale", "none")
    if delta is None:
        delta = slope_error_bound(history, order, stencil, scale)
    slopes = np.asarray(rates_of_change(history, order, stencil=stencil, scale=scale))
    if variant == "normalized":
        l1 = options.get("normalization", "sum") == "l1"
        denom = np.sum(np.abs(slopes)) if l1 else np.sum(slopes)
        ddenom = np.sum(delta) + 4 * EPS64 * np.sum(np.abs(slopes))
        if not abs(denom) > 2 * ddenom:
            return np.inf
        dz = abs(beta) * np.max(delta / abs(denom) + np.abs(slopes) * ddenom / denom**2)
    else:
        dz = abs(beta) * np.max(delta)
    return 1e-12 + 4 * dz


def assert_on_simplex(w, total: float = 1.0, atol: float = 1e-6) -> None:
    w = np.asarray(w, dtype=np.float64)
    assert np.all(np.isfinite(w)), w
    assert np.all(w >= 0), w
    np.testing.assert_allclose(np.sum(w), total, atol=atol * max(total, 1.0))


# ----------------------------------------------------------------------------- simplex properties
@PROPERTY_SETTINGS
@given(config=configurations(), sum_to_k=st.booleans())
def test_weights_are_finite_nonnegative_and_sum_to_one_float32(config, sum_to_k):
    """Default float32. loss_weighted uses eps=0 here: with eps=1e-8 tiny means sum to less than 1."""
    history, beta, variant, order, options = config
    num_components = history.shape[1]
    eps = 0.0 if variant == "loss_weighted" else 1e-8
    w = softadapt_weights(
        history.astype(np.float32),
        beta,
        variant=variant,
        accuracy_order=order,
        sum_to_k=sum_to_k,
        eps=eps,
        **options,
    )
    chex.assert_shape(w, (num_components,))
    assert w.dtype == jnp.float32
    chex.assert_tree_all_finite(w)
    assert_on_simplex(w, num_components if sum_to_k else 1.0)


@PROPERTY_SETTINGS
@given(config=configurations(), sum_to_k=st.booleans())
def test_weights_are_finite_nonnegative_and_sum_to_one_float64(config, sum_to_k):
    history, beta, variant, order, options = config
    num_components = history.shape[1]
    with jax.enable_x64(True):
        eps = 0.0 if variant == "loss_weighted" else 1e-8
        kw = dict(variant=variant, accuracy_order=order, eps=eps, **options)
        w = softadapt_weights(history, beta, **kw)
        assert w.dtype == jnp.float64
        assert_on_simplex(w, atol=1e-12 if eps == 0 else 1e-6)
        # sum_to_k multiplies by K.
        w_k = softadapt_weights(history, beta, sum_to_k=True, **kw)
        chex.assert_trees_all_close(w_k, num_components * w, rtol=1e-14, atol=0)
        assert_on_simplex(w_k, num_components)


@PROPERTY_SETTINGS
@given(history=histories())
def test_loss_weighted_eps_deficit(history):
    """Documented: with the default eps=1e-8 the weights sum to mean_sum / (mean_sum + 1e-8) at beta=0."""
    with jax.enable_x64(True):
        means = history.mean(axis=0)
        w = softadapt_weights(history, 0.0, variant="loss_weighted")
        np.testing.assert_allclose(np.sum(w), means.sum() / (means.sum() + 1e-8), rtol=1e-12)
        np.testing.assert_allclose(w, means / (means.sum() + 1e-8), rtol=1e-12)
        # and proportional to the means, exactly on the simplex, with eps=0.
        chex.assert_trees_all_close(
            softadapt_weights(history, 0.0, variant="loss_weighted", eps=0.0), means / means.sum(), rtol=1e-12
        )


# ----------------------------------------------------------------------------- invariances
@PROPERTY_SETTINGS
@given(config=configurations(), data=st.data())
def test_permutation_equivariance(config, data):
    history, beta, variant, order, options = config
    perm = np.asarray(data.draw(st.permutations(range(history.shape[1]))))
    with jax.enable_x64(True):
        eps = 0.0 if variant == "loss_weighted" else 1e-8  # the simplex exactly (see the eps test)
        kw = dict(variant=variant, accuracy_order=order, eps=eps, **options)
        w = np.asarray(softadapt_weights(history, beta, **kw))
        w_perm = np.asarray(softadapt_weights(history[:, perm], beta, **kw))
        assert_on_simplex(w_perm)
        rtol = weights_rtol(history, beta, variant, order, options)
        if rtol < 0.1:
            np.testing.assert_allclose(w_perm, w[perm], rtol=rtol, atol=1e-15)


@PROPERTY_SETTINGS
@given(history=histories(), variant=st.sampled_from(["original", "normalized"]), sum_to_k=st.booleans())
def test_beta_zero_gives_uniform_weights(history, variant, sum_to_k):
    num_components = history.shape[1]
    total = num_components if sum_to_k else 1.0
    with jax.enable_x64(True):
        w = softadapt_weights(history, 0.0, variant=variant, sum_to_k=sum_to_k)
        np.testing.assert_allclose(w, total / (num_components + 1e-8), rtol=1e-13)
    w32 = softadapt_weights(history.astype(np.float32), 0.0, variant=variant, sum_to_k=sum_to_k)
    np.testing.assert_allclose(w32, total / num_components, rtol=1e-6)


@PROPERTY_SETTINGS
@given(
    config=configurations(variants=("original",)),
    component=st.integers(0, 3),
    shift=st.floats(-1e3, 1e3, width=32),
)
def test_adding_a_constant_to_a_component_leaves_original_weights_unchanged(config, component, shift):
    history, beta, variant, order, options = config
    options = {**options, "scale": "none"}
    component = component % history.shape[1]
    shifted = history.copy()
    shifted[:, component] += shift
    with jax.enable_x64(True):
        kw = dict(variant=variant, accuracy_order=order, **options)
        w = softadapt_weights(history, beta, **kw)
        w_shifted = softadapt_weights(shifted, beta, **kw)
        delta = slope_error_bound(history, order, options["stencil"], "none") + slope_error_bound(
            shifted, order, options["stencil"], "none"
        )
        rtol = weights_rtol(history, beta, variant, order, options, delta=delta)
        if rtol < 0.1:
            np.testing.assert_allclose(w_shifted, w, rtol=rtol, atol=1e-15)


@PROPERTY_SETTINGS
@given(
    config=configurations(variants=("original", "loss_weighted"), min_components=2),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_large_beta_concentrates_on_the_extreme_slope(config, sign):
    """beta -> +inf puts all weight on the largest slope, beta -> -inf on the smallest."""
    history, _, variant, order, options = config
    options = {**options, "normalization": "sum"}
    with jax.enable_x64(True):
        slopes = np.asarray(
            rates_of_change(history, order, stencil=options["stencil"], scale=options["scale"])
        )
        delta = slope_error_bound(history, order, options["stencil"], options["scale"])
        ordered = np.sort(sign * slopes)
        gap = ordered[-1] - ordered[-2]
        assume(gap > 100 * np.max(delta) and gap > 0)
        # exp(-200) beats any ratio of means (at most 1e16 ~ e^37) in the loss-weighted variant.
        beta = sign * 200.0 / gap
        w = softadapt_weights(history, beta, variant=variant, accuracy_order=order, eps=0.0, **options)
        assert int(np.argmax(w)) == int(np.argmax(sign * slopes))
        assert float(np.max(w)) > 1 - 1e-12


@PROPERTY_SETTINGS
@given(config=configurations(variants=("original",), min_components=2))
def test_l1_normalization_keeps_the_ranking_of_the_original(config):
    history, beta, _, order, options = config
    assume(beta != 0)
    slope_kw = dict(stencil=options["stencil"], scale=options["scale"])
    with jax.enable_x64(True):
        kw = dict(accuracy_order=order, **slope_kw)
        w_original = np.asarray(softadapt_weights(history, beta, variant="original", **kw))
        w_l1 = np.asarray(softadapt_weights(history, beta, variant="normalized", normalization="l1", **kw))
        slopes = np.asarray(rates_of_change(history, order, **slope_kw))
        delta = slope_error_bound(history, order, **slope_kw)
        for i, j in itertools.permutations(range(history.shape[1]), 2):
            if slopes[i] - slopes[j] > 2 * (delta[i] + delta[j]):  # clearly s_i > s_j
                if beta > 0:
                    assert w_original[i] >= w_original[j] and w_l1[i] >= w_l1[j], (i, j)
                else:
                    assert w_original[i] <= w_original[j] and w_l1[i] <= w_l1[j], (i, j)


def test_sum_normalization_flips_the_ranking_when_every_loss_falls_and_l1_does_not():
    """The notes' example: slopes [-1, -2, -0.1]; the signed sum is negative."""
    history = np.array([[5.0, 10.0, 3.0], [4.0, 8.0, 2.9]])
    original = softadapt_weights(history, 5.0)
    by_sum = softadapt_weights(history, 5.0, variant="normalized")
    by_l1 = softadapt_weights(history, 5.0, variant="normalized", normalization="l1")
    np.testing.assert_allclose(by_sum, [0.160, 0.803, 0.037], atol=1e-3)
    np.testing.assert_allclose(original, [0.011, 7.4e-05, 0.989], rtol=1e-2)
    assert list(np.argsort(by_sum)) == [2, 0, 1]
    assert list(np.argsort(by_l1)) == list(np.argsort(original)) == [1, 0, 2]


# ----------------------------------------------------------------------------- documented fallbacks
@pytest.mark.parametrize(
    "history",
    [
        [[2.0, 1.0], [1.0, 2.0]],  # slopes -1, +1
        [[5.0, 3.0, 7.0], [3.0, 5.0, 7.0]],  # slopes -2, +2, 0
        [[4.0, 1e3, 0.5]] * 3,  # all slopes 0 (order 2: the float coefficients sum to exactly 0)
    ],
    ids=["two", "three", "constant"],
)
@pytest.mark.parametrize("beta", [-50.0, 0.1, 50.0])
@pytest.mark.parametrize("sum_to_k", [False, True])
def test_normalized_zero_signed_sum_gives_uniform_weights(history, beta, sum_to_k):
    history = np.asarray(history)
    num_components = history.shape[1]
    assert float(jnp.sum(rates_of_change(history))) == 0.0
    w = softadapt_weights(history, beta, variant="normalized", sum_to_k=sum_to_k)
    total = num_components if sum_to_k else 1.0
    chex.assert_trees_all_close(w, jnp.full(num_components, total / num_components), rtol=1e-6)


@pytest.mark.parametrize("x64_enabled", [False, True])
def test_constant_history_gives_zero_slopes_and_uniform_normalized_weights(x64_enabled):
    history = np.array([[4.0, 1e3, 0.5]] * 5)  # default order 4
    with jax.enable_x64(x64_enabled):
        np.testing.assert_array_equal(rates_of_change(history), 0.0)
        chex.assert_trees_all_close(
            softadapt_weights(history, 1.0, variant="normalized"), jnp.full(3, 1 / 3), rtol=1e-6
        )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("sum_to_k", [False, True])
def test_non_finite_history_gives_uniform_weights(variant, bad, sum_to_k):
    history = np.array([[3.0, 2.0, 1.0], [2.0, 1.5, 0.5], [1.0, 1.0, 0.25], [0.5, 0.9, 0.1]])
    history[1, 2] = bad
    w = softadapt_weights(history, 0.7, variant=variant, sum_to_k=sum_to_k)
    expected = 1.0 if sum_to_k else 1.0 / 3
    chex.assert_trees_all_close(w, jnp.full(3, expected, jnp.float32))


# ----------------------------------------------------------------------------- transformations
def _random_histories(seed: int, shape) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).uniform(-2.0, 2.0, size=shape)).astype(np.float32)


# Non-default options for each variant (the defaults under jit are covered by the recompilation
# test below, and eagerly by test_parity.py).
VARIANT_OPTIONS = [
    ("original", {"stencil": "backward", "scale": "log", "sum_to_k": True}),
    ("normalized", {"scale": "relative", "normalization": "l1"}),
    ("loss_weighted", {"stencil": "backward", "scale": "relative", "eps": 0.0}),
]


@pytest.mark.parametrize(("variant", "options"), VARIANT_OPTIONS, ids=[v for v, _ in VARIANT_OPTIONS])
def test_jit_and_vmap_agree_with_eager(variant, options):
    """float32; compiled code may fuse differently: exponents up to ~50 differ by an ulp or two."""
    histories_ = _random_histories(7, (3, 4, 3))
    betas = np.array([0.1, -2.0, 5.0], np.float32)
    fn = functools.partial(softadapt_weights, variant=variant, accuracy_order=2, **options)
    eager = jnp.stack([fn(h, b) for h, b in zip(histories_, betas, strict=True)])
    chex.assert_shape(eager, (3, 3))
    chex.assert_trees_all_close(jax.jit(fn)(histories_[1], betas[1]), eager[1], rtol=5e-5, atol=1e-7)
    # A batch of histories, each with its own beta.
    chex.assert_trees_all_close(jax.jit(jax.vmap(fn))(histories_, betas), eager, rtol=5e-5, atol=1e-7)
    # One history, a vector of betas.
    by_beta = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(histories_[0], betas)
    expected = jnp.stack([fn(histories_[0], b) for b in betas])
    chex.assert_trees_all_close(by_beta, expected, rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_new_beta_values_do_not_recompile(variant):
    """jit with defaults: one trace for any beta value, and equal to eager; likewise vmapped."""
    traces = []

    @jax.jit
    def fn(history, beta):
        traces.append(None)
        return softadapt_weights(history, beta, variant=variant)

    history = _random_histories(8, (4, 3))
    betas = (0.1, -3.0, 7.5, 0.0)
    outputs = [fn(history, beta) for beta in betas]
    assert len(traces) == 1
    assert fn._cache_size() == 1
    for beta, out in zip(betas, outputs, strict=True):
        # float32: exponents of ~25-50 carry a rounding error of a few 1e-6 relative.
        chex.assert_trees_all_close(
            out, softadapt_weights(history, beta, variant=variant), rtol=5e-5, atol=1e-7
        )
    # vmapped over a vector of betas: a single trace for any values.
    batched = jax.jit(jax.vmap(fn, in_axes=(None, 0)))
    by_beta = batched(history, jnp.asarray(betas))
    batched(history, jnp.linspace(-5, 5, 4))
    assert batched._cache_size() == 1
    chex.assert_trees_all_close(by_beta, jnp.stack(outputs), rtol=5e-5, atol=1e-7)


# Each variant with different options, all differentiated in one compiled function.
GRADIENT_OPTIONS = {
    "original": {},
    "normalized": {"stencil": "backward", "scale": "relative", "normalization": "l1"},
    "loss_weighted": {"scale": "log", "sum_to_k": True, "eps": 0.0},
}


def test_gradient_wrt_history_is_finite_and_matches_finite_differences(x64):
    """jax.grad (reverse mode) of every variant: finite, and equal to central finite differences.

    With ``scale="relative"`` and no ``reference`` the mean divisor is a ``stop_gradient`` constant
    (see ``slopes._scaled``), so the relative case fixes the reference explicitly. One small
    history and one jitted function for all variants keep the compilation short.
    """
    history = _random_histories(9, (4, 3)).astype(np.float64)
    direction = np.random.default_rng(10).normal(size=history.shape) * history
    probe = jnp.array([0.3, -1.2, 0.7])
    options = {**GRADIENT_OPTIONS, "normalized": {**GRADIENT_OPTIONS["normalized"], "reference": history[0]}}

    def objectives(h):
        return jnp.stack(
            [
                jnp.dot(softadapt_weights(h, 0.8, variant=v, accuracy_order=2, **options[v]), probe)
                for v in VARIANTS
            ]
        )

    grads = jax.jit(jax.jacrev(objectives))(history)  # [variant, T, K]
    chex.assert_shape(grads, (len(VARIANTS), *history.shape))
    chex.assert_tree_all_finite(grads)
    assert np.all(np.max(np.abs(grads), axis=(1, 2)) > 0)
    step = 1e-6
    forward = jax.jit(objectives)
    finite_difference = (forward(history + step * direction) - forward(history - step * direction)) / (
        2 * step
    )
    directional = jnp.tensordot(grads, direction, axes=2)
    chex.assert_trees_all_close(directional, finite_difference, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_input_gives_float32_weights(dtype, variant):
    history = jnp.asarray(_random_histories(10, (4, 3)), dtype)
    w = softadapt_weights(history, 0.5, variant=variant)
    assert w.dtype == jnp.float32
    chex.assert_trees_all_close(
        w, softadapt_weights(history.astype(jnp.float32), 0.5, variant=variant), rtol=1e-6
    )


def test_integer_input_is_promoted_and_python_beta_follows_the_history_dtype():
    history = np.array([[32, 11, 112], [10, 13, 46]])
    w = softadapt_weights(history, 0.1)
    assert w.dtype == jnp.float32
    # The notes' int64 example: [0.08308785, 0.91589206, 0.0010201].
    np.testing.assert_allclose(w, [0.08308785, 0.91589206, 0.0010201], rtol=1e-5)


# ----------------------------------------------------------------------------- errors
H = np.ones((5, 3))


ERROR_CASES = [
    (dict(history=np.ones(5)), ValueError, r"`history` must have shape \[T, K\].*\(5,\)"),
    (dict(history=np.ones((2, 3, 4))), ValueError, r"`history` must have shape \[T, K\].*\(2, 3, 4\)"),
    (dict(history=np.ones((5, 0))), ValueError, r"`history` must have K >= 1.*\(5, 0\)"),
    (dict(history=np.ones((1, 3))), ValueError, r"`history` has T=1 time step"),
    (dict(accuracy_order=5), ValueError, r"`accuracy_order`=5 needs 6 time steps.*T=5"),
    (dict(accuracy_order=0), ValueError, r"`accuracy_order` must be an integer >= 1, got 0"),
    (dict(accuracy_order=-3), ValueError, r"`accuracy_order` must be an integer >= 1, got -3"),
    (dict(accuracy_order=2.0), TypeError, r"`accuracy_order` must be an integer"),
    (dict(accuracy_order=True), TypeError, r"`accuracy_order` must be an integer"),
    (dict(variant="softadapt"), ValueError, r"`variant` must be one of .*got 'softadapt'"),
    (dict(temperature=1.0), ValueError, r"unknown option\(s\) \['temperature'\]"),
    (dict(normalization="l2"), ValueError, r"`normalization` must be one of \['l1', 'sum'\], got 'l2'"),
    (dict(stencil="central"), ValueError, r"`stencil` must be one of"),
    (dict(scale="sqrt"), ValueError, r"`scale` must be one of"),
    (dict(reference=np.ones(3)), ValueError, r"`reference` is only used with scale='relative'"),
    (dict(scale="relative", reference=np.ones(2)), ValueError, r"`reference` must have shape \[K\]"),
    (dict(beta=np.ones(2)), ValueError, r"`beta` must be a scalar, got shape \(2,\)"),
    (dict(beta=np.ones((1, 1))), ValueError, r"`beta` must be a scalar"),
    (dict(beta=True), TypeError, r"`beta` must hold real numbers"),
    (dict(beta=1j), TypeError, r"`beta` must hold real numbers"),
    (dict(beta="0.1"), TypeError, r"`beta` must be a numeric array"),
    (dict(history=np.ones((5, 3), bool)), TypeError, r"`history` must hold real numbers.*bool"),
    (dict(history=np.ones((5, 3)) * 1j), TypeError, r"`history` must hold real numbers.*complex"),
    (dict(history=[["a", "b"], ["c", "d"]]), TypeError, r"`history` must be a numeric array"),
    (dict(eps=-1e-8), ValueError, r"`eps` must be a float >= 0, got -1e-08"),
    (dict(eps=float("nan")), ValueError, r"`eps` must be a float >= 0"),
    (dict(eps="small"), ValueError, r"`eps` must be a float >= 0"),
    (dict(sum_to_k=1), TypeError, r"`sum_to_k` must be a bool, got 1"),
    (dict(sum_to_k="yes"), TypeError, r"`sum_to_k` must be a bool"),
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # JAX, on string input
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    ERROR_CASES,
    ids=[f"{i:02d}-{next(iter(kwargs))}" for i, (kwargs, _, _) in enumerate(ERROR_CASES)],
)
def test_error_messages(kwargs, exc, match):
    kwargs = {"history": H, "beta": 0.1, **kwargs}
    history = kwargs.pop("history")
    beta = kwargs.pop("beta")
    with pytest.raises(exc, match=match):
        softadapt_weights(history, beta, **kwargs)


def test_errors_are_raised_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="`accuracy_order`=5 needs 6 time steps"):
        jax.jit(functools.partial(softadapt_weights, accuracy_order=5))(H, 0.1)
    with pytest.raises(ValueError, match="`beta` must be a scalar"):
        jax.jit(softadapt_weights)(H, jnp.ones(3))


def test_options_dataclass_validates_and_is_hashable():
    assert hash(SoftAdaptOptions()) == hash(SoftAdaptOptions())
    with pytest.raises(ValueError, match="unknown option"):
        SoftAdaptOptions.from_kwargs({"bogus": 1}, "here")
    with pytest.raises(TypeError, match="sum_to_k"):
        SoftAdaptOptions(sum_to_k=None)


# ----------------------------------------------------------------------------- the quickstart example
def test_quickstart_example_runs_and_matches_the_seed_readme(capsys):
    """Runs examples/quickstart.py's main() in-process (it enables float64 globally: restored after)."""
    previous = jax.config.jax_enable_x64
    try:
        spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
        quickstart = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(quickstart)
        assert jax.config.jax_enable_x64
        status = quickstart.main()
    finally:
        jax.config.update("jax_enable_x64", previous)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "float64 [9.9343e-01, 6.5666e-03, 3.8908e-22]" in out
    assert "float32 [2.8850e-01, 1.9070e-03, 1.1299e-22, 7.0959e-01]" in out
    assert "all match the README" in out
