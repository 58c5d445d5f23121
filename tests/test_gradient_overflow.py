"""Gradient combiners and GradNorm on float32 gradients whose Gramian overflows (issue 15, item 12).

Gradients of norm above about 1.8e19 have squared norms beyond float32's range. The combiners
work on the Gramian of the gradients scaled by a power of two (``stacked_gramian(scaled=True)``),
which changes no rounding, so the assertions are of three kinds:

* finite output for finite gradients, every method and convention;
* exact (bit-for-bit up to the power of two): two common scales that are both above the scaling
  bound give the same Gramian ``G_hat``, hence the same weights, for every rule;
* to float32 rounding against the same gradients scaled down to ordinary magnitudes, for the rules
  that are invariant to a common scale. The rules with absolute guards are excluded where the
  guards matter: LibMTL's PCGrad and CAGrad (1e-8) in the mixed case, whose small components are
  comparable to the guard once scaled down, and LibMTL's MGDA solver for K >= 3 (absolute step
  thresholds). The mixed case is one component of norm ~1e20 and two of norm ~1.

Every case batch goes through one ``vmap``-ed, jitted update per method and convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softadapt_jax import balance, lr_annealing_balancer
from softadapt_jax.gradients import (
    CONVENTIONS,
    MGDA_CONVENTIONS,
    MGDA_NORMALIZATIONS,
    cagrad,
    cagrad_weights,
    component_norms,
    gradnorm,
    gramian,
    mgda,
    mgda_weights,
    pcgrad,
    pcgrad_weights,
    stacked_gramian,
)
from softadapt_jax.gradients.aggregators.pcgrad import _random_orders
from softadapt_jax.gradients.gradnorm import GRADNORM_CONVENTIONS
from softadapt_jax.gradients.per_component import combine_leaves, overflow_exponent
from softadapt_jax.training import BalancedTrainState, make_train_step

K = 3
RNG = np.random.default_rng(15)
BASE = {
    "a": jnp.asarray(RNG.normal(size=(K, 4, 3)), jnp.float32),
    "b": jnp.asarray(RNG.normal(size=(K, 5)), jnp.float32),
}
# Conflicting components, so that PCGrad projects and MGDA / CAGrad are not at a vertex.
BASE = jax.tree.map(lambda g: g.at[1].set(-0.8 * g[0] + 0.3 * g[1]), BASE)
PARAMS = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), BASE)
LOSSES = jnp.asarray([1.0, 0.5, 2.0], jnp.float32)

BIG, MID = 66, 40  # 2^66 ~ 7e19 per entry (norms ~3e20); 2^40 is also above the bound 2^32


def _scale(tree, row_exponents):
    factors = jnp.ldexp(jnp.ones(K, jnp.float32), jnp.asarray(row_exponents, jnp.int32))
    return jax.tree.map(lambda g: g * factors.reshape((K,) + (1,) * (g.ndim - 1)), tree)


# Row exponents of the six cases: [0] big, [1] mid, [2] ordinary; [3] mixed, [4] mixed scaled down
# by 2^26 (still above the bound), [5] mixed scaled down by 2^40 (below it, no scaling).
CASE_EXPONENTS = [
    [BIG] * K,
    [MID] * K,
    [0] * K,
    [BIG, 0, 0],
    [BIG - 26, -26, -26],
    [BIG - 40, -40, -40],
]
CASES = jax.tree.map(lambda *g: jnp.stack(g), *[_scale(BASE, e) for e in CASE_EXPONENTS])


# Every transform under test, by name; their updates on every case are computed in ONE jitted
# function (a module fixture): compiling them together costs a fraction of one jit each.
COMBINERS = {
    **{f"pcgrad/{c}": pcgrad(seed=3, convention=c) for c in CONVENTIONS},
    **{
        f"mgda/{c}/{n}": mgda(convention=c, normalization=n)
        for c in MGDA_CONVENTIONS
        for n in MGDA_NORMALIZATIONS
    },
    "mgda/libmtl/l2/raw": mgda(normalization="l2", combine="raw"),
    **{f"cagrad/{c}": cagrad(0.5, convention=c) for c in CONVENTIONS},
}
TWO = jax.tree.map(lambda g: g[:, :2], CASES)  # the first two components: LibMTL's MGDA pair rule


@pytest.fixture(scope="module")
def combined() -> dict:
    def run(tx, cases):
        state = tx.init(PARAMS)
        return jax.vmap(lambda u: tx.update(u, state, PARAMS, losses=LOSSES[: u["b"].shape[0]])[0])(cases)

    def everything(cases, two):
        out = {name: run(tx, cases) for name, tx in COMBINERS.items()}
        out["mgda/libmtl/none/two"] = run(COMBINERS["mgda/libmtl/none"], two)
        return out

    return jax.device_get(jax.jit(everything)(CASES, TWO))


def _case(tree, i):
    return jax.tree.map(lambda x: np.asarray(x[i]), tree)


def _assert_finite(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(leaf)), leaf


def _assert_scaled(a, b, exponent, *, rtol=0.0):
    # a == 2^exponent b, exactly (rtol=0) or to rtol.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, np.ldexp(y, exponent), rtol=rtol, atol=0)


def _check_update(out, degree, *, invariant, invariant_mixed, rtol=1e-6):
    """degree: 1 when the update scales with the gradients, 0 when it is scale-free (normalised)."""
    _assert_finite(out)
    # Both above the bound: the same G_hat, so the same coefficients, bit for bit.
    _assert_scaled(_case(out, 0), _case(out, 1), degree * (BIG - MID))
    _assert_scaled(_case(out, 3), _case(out, 4), degree * 26)
    if invariant:
        _assert_scaled(_case(out, 0), _case(out, 2), degree * BIG, rtol=rtol)
    if invariant_mixed:
        _assert_scaled(_case(out, 3), _case(out, 5), degree * 40, rtol=rtol)


# --- the reproductions: combiners as optax transforms -------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_pcgrad_finite_and_scale_invariant(combined: dict, convention: str) -> None:
    out = combined[f"pcgrad/{convention}"]
    # torchjd's PCGrad has no guard; LibMTL's 1e-8 is below float32 rounding next to ||g||^2 ~ 1
    # but not next to the scaled-down small components of the mixed case.
    _check_update(out, 1, invariant=True, invariant_mixed=convention == "torchjd", rtol=1e-5)


@pytest.mark.parametrize("normalization", MGDA_NORMALIZATIONS)
@pytest.mark.parametrize("convention", MGDA_CONVENTIONS)
def test_mgda_finite_and_scale_invariant(combined: dict, convention: str, normalization: str) -> None:
    out = combined[f"mgda/{convention}/{normalization}"]
    # The default combine="normalized" divides by n_k: with the l2-based normalisers the update
    # is scale-free, otherwise it scales with the gradients.
    degree = 0 if normalization in ("l2", "loss+") else 1
    # LibMTL's K >= 3 solver ignores steps below 1e-7 and steps a full unit otherwise, both
    # absolute: not scale-invariant (its K = 2 rule is, see the next test).
    invariant = convention != "libmtl"
    _check_update(out, degree, invariant=invariant, invariant_mixed=invariant)


def test_mgda_raw_combine_and_libmtl_two_components_scale_invariant(combined: dict) -> None:
    _check_update(combined["mgda/libmtl/l2/raw"], 1, invariant=False, invariant_mixed=False)
    out = combined["mgda/libmtl/none/two"]
    _assert_finite(out)
    _assert_scaled(_case(out, 0), _case(out, 1), BIG - MID)
    _assert_scaled(_case(out, 0), _case(out, 2), BIG, rtol=1e-6)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_cagrad_finite_and_scale_invariant(combined: dict, convention: str) -> None:
    out = combined[f"cagrad/{convention}"]
    # torchjd divides by the trace, whose 1e-4 threshold is far below these traces. LibMTL's
    # guards add 1e-8 to quantities of order 1 in the ordinary case (below float32 rounding,
    # up to the interior-point solver's float32 accuracy); in the mixed case scaled down they
    # meet squared norms of 1e-24 and dominate.
    libmtl = convention == "libmtl"
    _check_update(out, 1, invariant=True, invariant_mixed=not libmtl, rtol=1e-4 if libmtl else 1e-5)


def test_combined_update_does_not_overflow_where_representable() -> None:
    # 4 * 1e38 overflows, but 4 (g0 - g1) = (0, 2e38) does not; the terms are formed at scale 2^-e.
    g = [jnp.asarray([[1e38, 1e38], [1e38, 0.5e38]], jnp.float32)]
    e = overflow_exponent(jnp.float32(1e38), jnp.float32)
    assert int(e) > 0
    w = jnp.asarray([4.0, -4.0], jnp.float32)
    assert not np.all(np.isfinite(combine_leaves(w, g)[0]))  # the plain sum
    np.testing.assert_allclose(combine_leaves(w, g, exponent=e)[0], [0.0, 2e38], rtol=1e-6)


def test_overflow_exponent_leaves_ordinary_magnitudes_alone() -> None:
    peaks = jnp.asarray([0.0, 1.0, 2.0**32 - 2.0**8, 2.0**32, 3e38, jnp.inf, jnp.nan], jnp.float32)
    np.testing.assert_array_equal(overflow_exponent(peaks, jnp.float32), [0, 0, 0, 1, 96, 0, 0])
    with jax.enable_x64(True):
        assert int(overflow_exponent(jnp.float64(1e20), jnp.float64)) == 0  # bound 2^256 in float64


# --- GradNorm -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gradnorm_runs() -> dict:
    """Three updates of every convention, with its default optimizer and with Adam, on every case."""
    rates = jnp.asarray([[1.0, 1.0, 1.0], [0.9, 0.6, 0.95], [0.8, 0.5, 0.9]], jnp.float32)
    losses = LOSSES * rates

    def run(tx, u):
        def step(st, loss):
            upd, st = tx.update(u, st, PARAMS, losses=loss)
            return st, upd

        st, upd = jax.lax.scan(step, tx.init(PARAMS), losses)
        return st, jax.tree.map(lambda x: x[-1], upd)

    def everything(cases):
        out = {}
        for conv in GRADNORM_CONVENTIONS:
            for name, opt in (("default", None), ("adam", optax.adam(0.05))):
                tx = gradnorm(num_losses=K, layer="a", convention=conv, weight_optimizer=opt)
                out[f"{conv}/{name}"] = jax.vmap(lambda u, tx=tx: run(tx, u))(cases)
        return out

    return jax.device_get(jax.jit(everything)(CASES))


@pytest.mark.parametrize("convention", GRADNORM_CONVENTIONS)
def test_gradnorm_finite_and_scale_invariant_with_adam(gradnorm_runs: dict, convention: str) -> None:
    # Adam's step does not scale with the objective's gradient (up to its eps 1e-8, far below
    # these gradients), so the weights are the same at every scale to float32 rounding.
    state, upd = gradnorm_runs[f"{convention}/adam"]
    np.testing.assert_array_equal(state.rejected, 0)
    _assert_finite((state.weights, upd))
    w = np.asarray(state.weights)
    assert not np.allclose(w[2], 1.0)  # the weights did move
    # Above the bound GradNorm sees the same scaled norms: the same weights, bit for bit.
    np.testing.assert_array_equal(w[0], w[1])
    np.testing.assert_array_equal(w[3], w[4])
    np.testing.assert_allclose(w[0], w[2], rtol=1e-5)
    # Not asserted: the mixed case against its scaled-down copy [5], whose small components have
    # objective gradients of about 2^-40, below Adam's absolute eps (1e-8), unlike case [3]'s.


@pytest.mark.parametrize("convention", GRADNORM_CONVENTIONS)
def test_gradnorm_finite_with_default_optimizer(gradnorm_runs: dict, convention: str) -> None:
    # LibMTL's default SGD step scales with the layer norms, so only finiteness is scale-free.
    state, upd = gradnorm_runs[f"{convention}/default"]
    np.testing.assert_array_equal(state.rejected, 0)
    _assert_finite((state.weights, upd))
    np.testing.assert_allclose(np.sum(state.weights, axis=1), K, rtol=1e-5)


def test_component_norms_per_component_scale() -> None:
    norms = jax.jit(jax.vmap(lambda g: component_norms(g, "a")))(CASES)
    _assert_finite(norms)
    ordinary = np.asarray(norms[2])
    for i, e in enumerate(CASE_EXPONENTS):
        np.testing.assert_allclose(norms[i], np.ldexp(ordinary, e), rtol=1e-6)


def test_gradnorm_combination_does_not_overflow_where_representable() -> None:
    tx = gradnorm(num_losses=K, layer="a")
    state = tx.init(PARAMS)._replace(weights=jnp.asarray([2.0, 1.0, 0.0], jnp.float32))
    # 2 * 2e38 overflows, 2 * 2e38 - 3e38 = 1e38 does not.
    u = {"a": jnp.zeros((K, 4, 3)), "b": jnp.asarray([[2e38] * 5, [-3e38] * 5, [0.0] * 5], jnp.float32)}
    upd, _ = jax.jit(tx.update)(u, state, PARAMS, losses=LOSSES)
    np.testing.assert_allclose(upd["b"], [1e38] * 5, rtol=1e-6)


# --- the pure weight rules on the scaled Gramian -------------------------------------------------


def test_stacked_gramian_scaled_is_exact_and_finite() -> None:
    grams, exps = jax.jit(jax.vmap(lambda g: stacked_gramian(g, scaled=True)))(CASES)
    _assert_finite(grams)
    expected = [_expected_exponent(_case(CASES, i)) for i in range(len(CASE_EXPONENTS))]
    np.testing.assert_array_equal(exps, expected)
    assert int(exps[0]) > 0 and int(exps[2]) == int(exps[5]) == 0
    # The same G_hat for the two scales above the bound; 4^e G_hat is the true Gramian.
    np.testing.assert_array_equal(grams[0], grams[1])
    np.testing.assert_array_equal(grams[3], grams[4])
    np.testing.assert_allclose(grams[0], np.ldexp(np.asarray(grams[2]), 2 * (BIG - int(exps[0]))), rtol=1e-6)
    plain = jax.jit(jax.vmap(stacked_gramian))(CASES)
    assert not np.all(np.isfinite(plain[0]))  # unscaled, it overflows (as documented)
    np.testing.assert_array_equal(plain[2], grams[2])


def _expected_exponent(tree) -> int:
    # The exponent of the largest entry, less the float32 bound 2^32 (per_component.overflow_exponent).
    peak = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tree))
    return max(int(np.frexp(peak)[1]) - 32, 0)


def _linear_losses(row_exponents):
    # L(p) = A p: the per-component gradients are the rows of A (flattened BASE["a"]).
    a = _scale(BASE, row_exponents)["a"].reshape(K, -1)
    return lambda p: a @ p, jnp.ones(a.shape[1], jnp.float32)


@pytest.mark.parametrize("method", ["stacked", "sequential"])
def test_gramian_scaled_is_finite_and_exact(method: str) -> None:
    f_big, p = _linear_losses([BIG, 0, 0])
    f_small, _ = _linear_losses([BIG - 40, -40, -40])
    gram_big, e_big = jax.jit(gramian(f_big, method=method, scaled=True))(p)[1]
    gram_small, e_small = jax.jit(gramian(f_small, method=method, scaled=True))(p)[1]
    assert int(e_big) == _expected_exponent(f_big(jnp.eye(p.shape[0]))) > 0 and int(e_small) == 0
    _assert_finite(gram_big)
    np.testing.assert_allclose(gram_big, np.ldexp(np.asarray(gram_small), 2 * (40 - e_big)), rtol=1e-5)


def test_weight_rules_on_the_scaled_gramian() -> None:
    # The scale-invariant rules give the scaled Gramian of the mixed case the weights of the
    # same gradients scaled down to where nothing is scaled.
    f_big, p = _linear_losses([BIG, 0, 0])
    f_small, _ = _linear_losses([BIG - 40, -40, -40])
    orders = _random_orders(jax.random.PRNGKey(0), K)

    def rules(g):
        return jnp.stack(
            [
                pcgrad_weights(g, orders, convention="torchjd"),
                mgda_weights(g, convention="exact"),
                mgda_weights(g, convention="torchjd"),
                cagrad_weights(g, 0.5, convention="torchjd"),
            ]
        )

    def both(p):
        grams = jnp.stack([gramian(f_big, scaled=True)(p)[1][0], gramian(f_small)(p)[1]])
        return jax.vmap(rules)(grams)

    w_big, w_small = jax.jit(both)(p)
    _assert_finite(w_big)
    np.testing.assert_allclose(w_big, w_small, rtol=1e-5, atol=1e-7)


def test_gramian_scaled_methods_agree_and_validate() -> None:
    f, p = _linear_losses([BIG, 0, 0])
    g1, e1 = gramian(f, scaled=True)(p)[1]
    g2, e2 = gramian(f, method="sequential", scaled=True)(p)[1]
    assert int(e1) == int(e2)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6 * float(jnp.max(g1)))
    with pytest.raises(ValueError, match="`scaled` must be a bool"):
        gramian(f, scaled=1)
    with pytest.raises(ValueError, match="`scaled` must be a bool"):
        stacked_gramian(BASE, scaled="yes")


# --- learning-rate annealing with a set-point ----------------------------------------------------


@pytest.mark.parametrize("convention", ["wang2021", "physicsnemo"])
def test_lr_annealing_with_a_setpoint_is_finite_beyond_gramian_overflow(convention: str) -> None:
    """Issue 15 item 12: gradient norms beyond 1.8e19 (squares beyond float32) leave the weights
    finite and as at ordinary scale (the estimate is a ratio of gradient statistics; PhysicsNeMo's
    eps of 1e-8 is below float32 rounding next to a mean gradient of 1)."""
    a = jnp.asarray([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]], jnp.float32)
    bal = lr_annealing_balancer(
        num_losses=2, convention=convention, setpoint=[1.0, 2.0], update_every=1, params_filter="all"
    )
    step = make_train_step(lambda p, scale: (a @ p["w"]) * scale, balancer=bal)
    tx = optax.chain(balance(bal), optax.sgd(0.0))

    def run(scale: jax.Array) -> jax.Array:
        state = BalancedTrainState.create(apply_fn=None, params={"w": jnp.ones(3, jnp.float32)}, tx=tx)
        state, _ = jax.lax.scan(lambda s, _: (step(s, scale)[0], None), state, None, length=3)
        return state.weights

    scales = jnp.asarray([1.0, 1e19, 1e20, 1e30, 1e37], jnp.float32)
    weights = jax.jit(jax.vmap(run))(scales)
    _assert_finite(weights)
    assert np.all(np.asarray(weights) > 0)
    np.testing.assert_allclose(weights, np.broadcast_to(weights[0], weights.shape), rtol=1e-6)
