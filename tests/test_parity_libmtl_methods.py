"""Parity of LibMTL's methods that torchjd lacks: GLS, STCH, FAMO, DB-MTL, MoCo, MoDo, SDMGrad, IMTL.

The reference (``tests/data/libmtl_weightings.json``, README §2) ran each
LibMTL weighting (git 4336804) through its own HPS architecture in float64:
two 20-step sequences per method (K = 3 and 4), and for IMTL also one step
on a fresh model for each of the shared matrices. For the loss-level methods
(GLS, STCH, FAMO) the gradients are ``g_k = e_k``, so ``combined_grad`` is the
coefficient vector itself. Each sequence runs as one ``lax.scan`` under one
``jax.jit`` per method (retraced once per K); the IMTL single steps are
vmapped over the cases of each (K, n).

Checked at every step: ``combined_grad`` and every recorded field our API
exposes (the states ``grad_buffer``, ``y``, ``lambd``, ``w``, ``nadir_vector``,
FAMO's logits after ``update_w``, IMTL's ``loss_scale.grad`` and
``loss_scale_after_sgd``, the weights LibMTL returns where they describe the
update). Every method is the same algorithm in closed form or a fixed number
of iterations (no solver tolerance), so the tolerance is ``rtol=1e-6`` with,
on updates, ``atol = 1e-6 * sum_k |c_k| ||g_k||``: an rtol of 1e-6 on the
coefficients moves a combination of cancelling gradients by that much.
Not exposed, so not checked: ``last_backward_scalar`` (the scalar LibMTL
back-propagates) and ``train_loss_buffer_col_after_epoch`` (the Trainer's
loss log).

IMTL cases where LibMTL fails (NaN for a zero gradient, ``LinAlgError`` for
duplicate gradients) check our documented fallback instead: finite, the mean
of the gradients, and the recorded ``loss_scale.grad`` where there is one.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_array

from softadapt_jax.gradients.aggregators.db_mtl import DBMTLState, db_mtl, db_mtl_weights
from softadapt_jax.gradients.aggregators.famo import famo, famo_update_weights, famo_weights
from softadapt_jax.gradients.aggregators.gls import gls, gls_weights
from softadapt_jax.gradients.aggregators.imtl import IMTLState, imtl, imtl_weights
from softadapt_jax.gradients.aggregators.moco import moco
from softadapt_jax.gradients.aggregators.modo import modo
from softadapt_jax.gradients.aggregators.sdmgrad import sdmgrad
from softadapt_jax.gradients.aggregators.stch import stch, stch_nadir

DATA = pathlib.Path(__file__).parent / "data" / "libmtl_weightings.json"
RTOL = 1e-6


@functools.lru_cache(maxsize=1)
def _methods() -> dict[str, Any]:
    return json.loads(DATA.read_text())["methods"]


def _update_atol(coeffs: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """``1e-6 * sum_k |c_k| ||g_k||`` per leading index (the scale of the cancelling terms)."""
    return RTOL * np.sum(np.abs(coeffs) * np.linalg.norm(grads, axis=-1), axis=-1, keepdims=True)


def _close(actual: Any, expected: Any, atol: Any = 0.0, what: str = "") -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    ok = np.abs(actual - expected) <= atol + RTOL * np.abs(expected)
    assert ok.all(), f"{what}: max |diff| {np.max(np.abs(actual - expected)):.3g}"


# ---------------------------------------------------------------- sequences

# method in the JSON -> (factory kwargs, our factory); STCH's two steps per epoch are the harness's.
SEQUENCE_METHODS = {
    "GLS": lambda: gls(),
    "STCH": lambda: stch(steps_per_epoch=2),
    "FAMO": lambda: famo(),
    "DB_MTL": lambda: db_mtl(),
    "MoCo": lambda: moco(),
    "MoDo": lambda: modo(),
    "SDMGrad": lambda: sdmgrad(),
    "IMTL-seq": lambda: imtl(),
}


@functools.cache
def _scan_runner(method: str):
    """One jitted ``lax.scan`` over the steps: per step the direction and the states before/after."""
    agg = SEQUENCE_METHODS[method]()

    def body(state, xs):
        jac, losses, after = xs
        d, new = agg.update(jac, state, losses=losses)
        if method == "FAMO":
            new = famo_update_weights(new, after)
        # Coefficients that need the step's inputs, computed under the same jit.
        if method == "IMTL-seq":
            extra = imtl_weights(jnp.exp(state.loss_scale)[:, None] * jac)
        elif method == "DB_MTL":
            extra = db_mtl_weights(new.grad_buffer)
        elif method == "STCH":
            extra = stch_nadir(new)
        else:
            extra = jnp.zeros(())
        return new, (d, state, new, extra)

    @functools.partial(jax.jit, static_argnums=(3, 4))
    def run(jacs, losses, after, k, n):
        return jax.lax.scan(body, agg.init(k, n, jnp.float64), (jacs, losses, after))[1]

    return run


def _sequence_case(method: str, case: dict[str, Any], nan_step: int | None = None):
    inp = case["inputs"]
    k, n = inp["K"], inp["n_shared_params"]
    steps = inp["per_step"]
    losses = reference_array([p["losses"] for p in steps])
    if "grads" in steps[0]:
        jacs = reference_array([p["grads"] for p in steps])
    else:  # loss-level methods: g_k = e_k
        jacs = np.broadcast_to(np.eye(k), (len(steps), k, k)).copy()
    after = reference_array([p.get("losses_after_step", p["losses"]) for p in steps])
    if nan_step is not None:  # a NaN in one gradient entry of one step
        jacs[(nan_step,) + (0,) * (jacs.ndim - 2) + (-1,)] = np.nan
    d, before, new, extra = _scan_runner(method)(
        jnp.asarray(jacs), jnp.asarray(losses), jnp.asarray(after), k, n
    )
    return jacs, steps, case["expected"]["per_step"], np.asarray(d), before, new, np.asarray(extra)


@pytest.mark.parametrize("method", sorted(SEQUENCE_METHODS))
def test_a_non_finite_step_is_skipped(x64, method):
    """A NaN in step t's Jacobian: zero update at t, the state unchanged by it, nothing NaN later."""
    case = _methods()[method]["cases"][0]
    t = 7
    _, _, _, d, before, new, _ = _sequence_case(method, case, nan_step=t)
    assert np.all(np.isfinite(d)) and np.all(d[t] == 0)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(new), strict=True):
        if method == "FAMO" and a.dtype == bool:
            continue  # `pending` is consumed by the weight step that follows the skipped update
        np.testing.assert_array_equal(np.asarray(a)[t], np.asarray(b)[t])
        if a.dtype.kind == "f":
            assert np.all(np.isfinite(np.asarray(a)))


@pytest.mark.parametrize("method", sorted(SEQUENCE_METHODS))
def test_sequences_match_libmtl(x64, method):
    cases = _methods()[method]["cases"]
    assert len(cases) == 2
    for case in cases:
        jacs, steps, exp, d, before, new, extra = _sequence_case(method, case)
        exp_grad = reference_array([e["combined_grad"] for e in exp])
        t = len(exp)
        assert d.shape == exp_grad.shape == (t, jacs.shape[-1])
        what = f"{case['id']}"
        if method in ("GLS", "STCH", "FAMO"):
            # combined_grad is the coefficient vector (g = identity): plain rtol.
            _close(d, exp_grad, what=f"{what} coefficients")
        elif method == "DB_MTL":
            buf = reference_array([e["grad_buffer"] for e in exp])
            _close(new.grad_buffer, buf, atol=1e-12 * np.abs(buf).max(), what=f"{what} grad_buffer")
            _close(d, exp_grad, atol=_update_atol(extra, buf), what=f"{what} combined_grad")
        elif method == "MoCo":
            y = reference_array([e["y"] for e in exp])
            _close(new.y, y, atol=1e-12 * np.abs(y).max(), what=f"{what} y")
            _close(new.lambd, reference_array([e["lambd"] for e in exp]), what=f"{what} lambd")
            _close(
                new.lambd,
                reference_array([e["returned_weights"] for e in exp]),
                what=f"{what} returned_weights",
            )
            _close(d, exp_grad, atol=_update_atol(np.asarray(new.lambd), y), what=f"{what} combined_grad")
        elif method == "MoDo":
            lam = reference_array([e["lambd"] for e in exp])
            # The simplex projection sets weights to exactly 0: an absolute floor of 1e-12.
            _close(new.lambd, lam, atol=1e-12, what=f"{what} lambd")
            _close(
                new.lambd,
                reference_array([e["returned_weights"] for e in exp]),
                atol=1e-12,
                what=f"{what} returned",
            )
            _close(d, exp_grad, atol=_update_atol(lam, jacs[:, 2]), what=f"{what} combined_grad")
        elif method == "SDMGrad":
            w = reference_array([e["w"] for e in exp])
            _close(new.w, w, atol=1e-12, what=f"{what} w")
            zeta = jacs[:, 0]
            coeffs = (w + 0.3 / w.shape[-1]) / 1.3
            _close(d, exp_grad, atol=_update_atol(coeffs, zeta), what=f"{what} combined_grad")
        elif method == "IMTL-seq":
            s_before = reference_array([p["loss_scale_before"] for p in steps])
            _close(before.loss_scale, s_before, atol=1e-15, what=f"{what} loss_scale_before")
            _close(
                new.loss_scale_grad,
                reference_array([e["loss_scale.grad"] for e in exp]),
                what=f"{what} loss_scale.grad",
            )
            _close(
                new.loss_scale,
                reference_array([e["loss_scale_after_sgd"] for e in exp]),
                atol=1e-15,
                what=f"{what} s",
            )
            scaled = np.exp(s_before)[..., None] * jacs
            alpha = extra
            _close(
                alpha, reference_array([e["returned_weights"] for e in exp]), what=f"{what} returned_weights"
            )
            _close(d, exp_grad, atol=_update_atol(alpha, scaled), what=f"{what} combined_grad")
        if method in ("MoCo", "MoDo", "SDMGrad"):
            w = np.asarray(new.w if method == "SDMGrad" else new.lambd)
            assert np.all(w >= 0) and np.allclose(w.sum(-1), 1.0, rtol=0, atol=1e-12), (
                f"{what} off the simplex"
            )
        if method == "STCH":
            rec = [i for i, e in enumerate(exp) if e["nadir_vector"] is not None]
            assert rec, "the STCH sequence should pass its warm-up"
            nadir = extra[rec]
            _close(nadir, reference_array([exp[i]["nadir_vector"] for i in rec]), what=f"{what} nadir_vector")
        if method == "FAMO":
            _close(
                before.logits,
                reference_array([p["w_before"] for p in steps]),
                atol=1e-15,
                what=f"{what} w_before",
            )
            _close(
                new.logits,
                reference_array([e["w_after_update_w"] for e in exp]),
                atol=1e-15,
                what=f"{what} w after",
            )
        if method == "GLS":
            # LibMTL's *returned* weights L_k / (K prod L) are not its coefficients (README): ours are.
            losses = reference_array([p["losses"] for p in steps])
            assert not np.allclose(reference_array([e["returned_weights"] for e in exp]), exp_grad)
            _close(jax.jit(jax.vmap(gls_weights))(jnp.asarray(losses)), exp_grad, what=f"{what} gls_weights")


# ---------------------------------------------------------------- IMTL single steps


@functools.lru_cache(maxsize=1)
def _imtl_single_runner():
    agg = imtl()

    @jax.jit
    def run(jacs, losses):
        def one(j, lo):
            d, st = agg.update(j, agg.init(j.shape[0], j.shape[1], j.dtype), losses=lo)
            return d, st.loss_scale_grad, imtl_weights(j)

        return jax.vmap(one)(jacs, losses)

    return run


def _imtl_groups() -> dict[int, list[dict[str, Any]]]:
    groups: dict[int, list[dict[str, Any]]] = {}
    for case in _methods()["IMTL"]["cases"]:
        groups.setdefault(len(case["inputs"]["grads"]), []).append(case)
    return groups


def _ill_conditioned(g: np.ndarray) -> bool:
    """Whether rounding alone can move IMTL's weights by more than RTOL: cond(D U^T) > RTOL / eps."""
    with np.errstate(all="ignore"):
        u = g / np.linalg.norm(g, axis=1, keepdims=True)
        m = (g[0] - g[1:]) @ (u[0] - u[1:]).T
        return bool(np.linalg.cond(m) > RTOL / np.finfo(np.float64).eps)


def test_imtl_single_steps_match_libmtl(x64):
    counts = {"matched": 0, "fallback": 0, "ill_conditioned": 0}
    for cases in _imtl_groups().values():
        # Zero-padding the parameters changes no norm or inner product: one shape per K.
        n_max = max(len(c["inputs"]["grads"][0]) for c in cases)
        jacs = np.stack(
            [
                np.pad(
                    reference_array(c["inputs"]["grads"]), ((0, 0), (0, n_max - len(c["inputs"]["grads"][0])))
                )
                for c in cases
            ]
        )
        losses = np.stack([reference_array(c["inputs"]["losses"]) for c in cases])
        d, s_grad, alpha = (
            np.asarray(a) for a in _imtl_single_runner()(jnp.asarray(jacs), jnp.asarray(losses))
        )
        for i, case in enumerate(cases):
            exp, n, cid = case["expected"], len(case["inputs"]["grads"][0]), case["id"]
            g, di = jacs[i, :, :n], d[i, :n]
            assert np.all(d[i, n:] == 0)
            assert np.all(np.isfinite(di)), cid
            if "raises" in exp or not np.all(np.isfinite(reference_array(exp["combined_grad"]))):
                # LibMTL raised LinAlgError (duplicate rows) or gave NaN (a zero row): our
                # documented fallback, the mean of the (unscaled, s = 0) gradients.
                assert "LinAlgError" in exp.get("raises", "LinAlgError")
                assert case["kind"] in ("zero_row", "zero_matrix", "duplicate"), cid
                np.testing.assert_allclose(di, g.mean(axis=0), rtol=1e-12, atol=1e-300)
                if "loss_scale.grad" in exp:
                    _close(s_grad[i], reference_array(exp["loss_scale.grad"]), what=f"{cid} loss_scale.grad")
                counts["fallback"] += 1
                continue
            _close(s_grad[i], reference_array(exp["loss_scale.grad"]), what=f"{cid} loss_scale.grad")
            ref_alpha = reference_array(exp["returned_weights"])
            scale = _update_atol(ref_alpha, g)
            if _ill_conditioned(g):
                # D U^T is (nearly) singular (K > n, exact +-pairs, rank 1): LibMTL's explicit
                # inverse returns rounding noise. Ours is either the documented mean fallback
                # (singular to working precision) or satisfies IMTL's defining property: equal
                # projections of d on every unit gradient, to the solve's backward error.
                if np.all(np.isfinite(alpha[i])):
                    proj = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ di
                    assert np.ptp(proj) <= _update_atol(alpha[i], g)[0], (cid, proj)
                else:
                    np.testing.assert_allclose(di, g.mean(axis=0), rtol=1e-12, atol=1e-300)
                counts["ill_conditioned"] += 1
                continue
            # Weights that are zero up to rounding (exact cancellations): an absolute 1e-12 floor.
            _close(alpha[i], ref_alpha, atol=1e-12 * np.abs(ref_alpha).max(), what=f"{cid} returned_weights")
            _close(di, reference_array(exp["combined_grad"]), atol=scale, what=f"{cid} combined_grad")
            counts["matched"] += 1
    assert sum(counts.values()) == len(_methods()["IMTL"]["cases"])
    assert counts["matched"] >= 25 and counts["fallback"] >= 7, counts


# ---------------------------------------------------------------- properties


def _gaussian(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def test_imtl_projections_are_equal(x64):
    j = np.asarray(_gaussian(0, 4, 9))
    alpha = np.asarray(jax.jit(imtl_weights)(j))
    proj = (j / np.linalg.norm(j, axis=1, keepdims=True)) @ (alpha @ j)
    np.testing.assert_allclose(proj, np.full_like(proj, proj[0]), rtol=1e-10)
    assert abs(alpha.sum() - 1.0) < 1e-12
    assert imtl_weights(j[:1]).tolist() == [1.0]


def test_gls_is_invariant_to_a_common_loss_scale(x64):
    losses = jnp.asarray([0.3, 2.0, 5.0])
    # The coefficients are the gradient of (prod L)^(1/K).
    ours, scaled, auto = jax.jit(
        lambda lo: (gls_weights(lo), gls_weights(lo * 1e3), jax.grad(lambda x: jnp.prod(x) ** (1 / 3))(lo))
    )(losses)
    np.testing.assert_allclose(scaled, ours, rtol=1e-12)
    np.testing.assert_allclose(ours, auto, rtol=1e-12)


def test_famo_coefficients_are_the_gradient_of_its_loss(x64):
    logits, losses = jnp.asarray([0.2, -0.1, 0.4]), jnp.asarray([1.5, 0.2, 3.0])

    @jax.jit
    def both(logits, losses):
        z = jax.nn.softmax(logits)
        c = jax.lax.stop_gradient(jnp.sum(z / (losses + 1e-8)))
        return famo_weights(logits, losses), jax.grad(lambda lo: jnp.sum(jnp.log(lo + 1e-8) * z / c))(losses)

    ours, auto = both(logits, losses)
    np.testing.assert_allclose(ours, auto, rtol=1e-12)


def test_vmap_over_states_equals_a_loop(x64):
    agg = db_mtl()
    jacs, losses = _gaussian(2, 2, 3, 5), np.abs(_gaussian(3, 2, 3)) + 0.1

    @jax.jit
    def both(jacs, losses):
        init = agg.init(3, 5, jnp.float64)
        states = jax.tree.map(lambda a: jnp.stack([a, a]), init)
        vmapped = jax.vmap(lambda j, s, lo: agg.update(j, s, losses=lo))(jacs, states, losses)
        looped = [agg.update(jacs[i], init, losses=losses[i]) for i in range(2)]
        return vmapped, looped

    (d, new), looped = both(jacs, losses)
    for i, (di, si) in enumerate(looped):
        np.testing.assert_allclose(d[i], di, rtol=1e-14)
        np.testing.assert_allclose(new.grad_buffer[i], si.grad_buffer, rtol=1e-14)


def test_stch_counts_epochs_in_calls(x64):
    agg = stch(warmup_epoch=1, steps_per_epoch=2)
    losses = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [2.0, 6.0], [4.0, 8.0], [1.0, 1.0]])

    def body(st, lo):
        d, st = agg.update(jnp.eye(2, dtype=lo.dtype), st, losses=lo)
        return st, d

    st, seen = jax.jit(lambda lo: jax.lax.scan(body, agg.init(2, 2, jnp.float64), lo))(losses)
    # Epochs 0 and 1 (calls 0-3): coefficients 1/L; epoch 1's losses average to the nadir [3, 7].
    np.testing.assert_allclose(seen[2], [0.5, 1 / 6], rtol=1e-12)
    np.testing.assert_allclose(stch_nadir(st), [3.0, 7.0], rtol=1e-12)
    assert int(st.loss_count) == 2 and int(st.step) == 5
    ratio = np.asarray([1 / 3, 1 / 7])
    soft = ratio / ratio.sum()  # softmax(log(ratio) / mu) with mu = 1
    np.testing.assert_allclose(seen[4], 2 * soft / ratio / np.asarray([3.0, 7.0]), rtol=1e-9)


def test_famo_weight_step_needs_a_prior_update(x64):
    st = famo().init(3, 3, jnp.float64)
    new = jax.jit(famo_update_weights)(st, jnp.full(3, 0.5))
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(st), strict=True))
    with pytest.raises(ValueError, match="`losses_after` must have shape"):
        famo_update_weights(st, jnp.ones(4))


def test_float32_runs(x64):
    del x64
    with jax.enable_x64(False):
        jac = _gaussian(4, 3, 3, 5).astype(np.float32)
        lo = jnp.asarray([1.0, 2.0, 0.5], jnp.float32)
        one = (gls(), stch(), famo(), db_mtl(), moco(), imtl())
        three = (modo(), sdmgrad())

        @jax.jit
        def run(jac, lo):
            ds = [agg.update(jac[0], agg.init(3, 5), losses=lo)[0] for agg in one]
            return jnp.stack(ds + [agg.update(jac, agg.init(3, 5))[0] for agg in three])

        d = run(jac, lo)
        assert d.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(d)))


def test_a_single_task_gives_its_gradient(x64):
    j, lo = jnp.asarray([[1.0, -2.0, 0.5]]), jnp.ones(1)

    @jax.jit
    def run(j, lo):
        plain = [
            agg.update(j, agg.init(1, 3, j.dtype), losses=lo)[0] for agg in (gls(), stch(), famo(), imtl())
        ]
        three = jnp.stack([j, j, j])
        return jnp.stack(
            plain + [agg.update(three, agg.init(1, 3, j.dtype))[0] for agg in (modo(), sdmgrad())]
        )

    np.testing.assert_allclose(run(j, lo), np.broadcast_to(j, (6, 3)), rtol=1e-12)


def test_gls_non_positive_loss_gives_zero_update(x64):
    d = jax.jit(lambda lo: gls()(jnp.eye(3), losses=lo))(jnp.asarray([0.0, 1.0, 2.0]))
    assert bool(jnp.all(d == 0))


def test_imtl_fallback_is_the_mean(x64):
    # Two equal rows (anywhere, any scales) make D U^T singular: rounding may leave a pivot of
    # order eps instead of an exact 0, which must be caught as well. Also a zero row.
    rng = np.random.default_rng(6)
    jacs = rng.standard_normal((64, 4, 6)) * 10.0 ** rng.uniform(-3, 3, (64, 4, 1))
    for b in range(64):
        i, k = rng.choice(4, 2, replace=False)
        jacs[b, k] = jacs[b, i] if b < 60 else 0.0
    agg = imtl()
    run = jax.jit(jax.vmap(lambda j: agg.update(j, agg.init(4, 6, jnp.float64), losses=jnp.ones(4))))
    d, st = run(jnp.asarray(jacs))
    np.testing.assert_allclose(d, jacs.mean(axis=1), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(st.loss_scale_grad, np.zeros((64, 4)), atol=1e-15)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("factory", [modo, sdmgrad])
def test_three_batch_methods_reject_a_plain_jacobian(factory):
    agg = factory()
    with pytest.raises(ValueError, match=r"three batches: `jacobian` must have shape \[3, K, n\]"):
        agg.update(jnp.ones((3, 4)), agg.init(3, 4))
    with pytest.raises(ValueError, match=r"`losses` must have shape \(3, 3\)"):
        agg.update(jnp.ones((3, 3, 4)), agg.init(3, 4), losses=jnp.ones(3))
    with pytest.raises(ValueError, match="init the state with the same K"):
        agg.update(jnp.ones((3, 2, 4)), agg.init(3, 4))


@pytest.mark.parametrize("factory", [db_mtl, moco])
def test_buffer_methods_reject_a_state_of_another_shape(factory):
    agg = factory()
    with pytest.raises(ValueError, match=r"init the state with the same \(K, n\)"):
        agg.update(jnp.ones((3, 5)), agg.init(3, 4), losses=jnp.ones(3))


def test_imtl_rejects_a_state_of_another_k():
    with pytest.raises(ValueError, match="init the state with the same K"):
        imtl().update(jnp.ones((3, 5)), IMTLState(jnp.zeros(2), jnp.zeros(2)), losses=jnp.ones(3))


def test_losses_are_required():
    for agg, state in ((gls(), ()), (db_mtl(), DBMTLState(jnp.zeros((), jnp.int32), jnp.zeros((2, 3))))):
        with pytest.raises(ValueError, match="reads the current losses"):
            agg.update(jnp.ones((2, 3)), state)


def test_invalid_options():
    with pytest.raises(ValueError, match="`lamda` must not be -1"):
        sdmgrad(lamda=-1.0)
    with pytest.raises(ValueError, match="`mu`"):
        stch(mu=0.0)
    with pytest.raises(ValueError, match="`warmup_epoch`"):
        stch(warmup_epoch=-1)
    with pytest.raises(ValueError, match="`loss_scale_lr`"):
        imtl(loss_scale_lr=-0.1)
    with pytest.raises(ValueError, match="`w_lr`"):
        famo_update_weights(famo().init(2, 2), jnp.ones(2), w_lr=-1.0)
