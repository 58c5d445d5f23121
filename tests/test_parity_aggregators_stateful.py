"""Parity of the stateful aggregators NashMTL, PCD and ExcessMTL with torchjd 0.18.0 and LibMTL.

Single-step cases start from a fresh state and are mapped (``lax.map``, one jit) over the
cases of one shape; sequence cases run one state through ``lax.scan``. Nash-MTL's
result depends on J only through J J^T, and its update is ``w @ J``, so its
cases are padded with zero columns to one width and grouped by K: the padding
changes neither the Gramian nor the leading entries of the update (its own
entries are exact zeros).
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import decode_special
from scipy.optimize import minimize, nnls

from softadapt_jax.gradients.aggregators.excess_mtl import excess_mtl, excess_mtl_step
from softadapt_jax.gradients.aggregators.nash_mtl import NashMTLState, nash_mtl, nash_mtl_step
from softadapt_jax.gradients.aggregators.pcd import PCDState, pcd, pcd_step

DATA = pathlib.Path(__file__).parent / "data"
_PAD = 100  # widest recorded n


@functools.cache
def _methods(name: str) -> dict:
    return decode_special(json.loads((DATA / name).read_text()))["methods"]


def _torchjd(method: str) -> list[dict]:
    return _methods("torchjd_aggregators.json")[method]["cases"]


def _single(cases):
    return [c for c in cases if "J" in c["inputs"]]


def _sequences(cases):
    return [c for c in cases if "J_sequence" in c["inputs"]]


def _groups(cases, key):
    out: dict = {}
    for c in cases:
        out.setdefault(key(c), []).append(c)
    return out


# ----------------------------------------------------------------------------- PCD (exact active set)


def _padded(group, key="J"):
    """The group's matrices (all with K rows) padded with zero columns to width _PAD."""
    k = len(group[0]["inputs"][key])
    js = np.zeros((len(group), k, _PAD))
    for i, c in enumerate(group):
        j = np.asarray(c["inputs"][key])
        js[i, :, : j.shape[1]] = j
    return jnp.asarray(js)


def _pcd_single(cases):
    # PCD depends on J through J J^T only, and its update is w @ J: zero columns change nothing.
    for k, group in _groups(cases, lambda c: len(c["inputs"]["J"])).items():
        state = PCDState(jnp.zeros((k,)), jnp.zeros((), jnp.int32))
        taus = jnp.full((k - 1,), 0.02)
        step = jax.jit(
            lambda js, state=state, taus=taus: jax.lax.map(lambda j: pcd_step(j, state, taus)[:2], js)
        )
        yield group, step(_padded(group))


def test_pcd_single_matches_torchjd(x64):
    checked = 0
    for group, (d, w) in _pcd_single(_single(_torchjd("PCD"))):
        for c, di, wi in zip(group, np.asarray(d), np.asarray(w)):
            di = di[: np.shape(c["inputs"]["J"])[1]]
            # Same algorithm (Goldfarb-Idnani active set) in float64.
            np.testing.assert_allclose(di, c["expected"]["update"], rtol=1e-6, atol=1e-12, err_msg=c["id"])
            np.testing.assert_allclose(wi, c["expected"]["weights"], rtol=1e-6, atol=1e-12, err_msg=c["id"])
            checked += 1
    assert checked == len(_single(_torchjd("PCD")))


def _scan_sequence(agg, seq):
    js = jnp.asarray(seq)
    state = agg.init(js.shape[1], js.shape[2], js.dtype)

    def body(s, j):
        d, s = agg.update(j, s)
        return s, d

    return np.asarray(jax.jit(lambda s, js: jax.lax.scan(body, s, js)[1])(state, js))


@pytest.mark.parametrize("method,factory", [("PCD", pcd), ("ExcessMTL", excess_mtl)])
def test_sequences_match_torchjd(x64, method, factory):
    for c in _sequences(_torchjd(method)):
        ds = _scan_sequence(factory(**c["constructor_args"]), c["inputs"]["J_sequence"])
        np.testing.assert_allclose(ds, c["expected"]["updates"], rtol=1e-6, atol=1e-12, err_msg=c["id"])


def test_pcd_is_asymmetric_and_keeps_row0_norm(x64):
    j = jnp.asarray([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0], [0.2, -0.3, 1.0]])
    agg = pcd()
    run = jax.jit(jax.vmap(lambda j: agg.update(j, agg.init(3, 3, j.dtype))[0]))
    d, d_swapped = run(jnp.stack([j, j[::-1]]))
    assert np.isclose(np.linalg.norm(d), 1.0)
    assert not np.allclose(d, d_swapped)
    # Every secondary row keeps at least tau of its normalised progress.
    assert np.all(np.asarray(j[1:] @ d) > 0)


# ----------------------------------------------------------------------------- ExcessMTL


def test_excess_mtl_single_matches_torchjd(x64):
    cases = _single(_torchjd("ExcessMTL"))
    # Zero columns add 0 to every excess-risk sum (0 / sqrt(0 + 1e-7)) and give zero update entries.
    for k, group in _groups(cases, lambda c: len(c["inputs"]["J"])).items():
        state = excess_mtl().init(k, _PAD, jnp.float64)
        d, w, _ = jax.jit(jax.vmap(lambda j: excess_mtl_step(j, state)))(_padded(group))
        for c, di, wi in zip(group, np.asarray(d), np.asarray(w)):
            di = di[: np.shape(c["inputs"]["J"])[1]]
            np.testing.assert_allclose(di, c["expected"]["update"], rtol=1e-6, atol=1e-12, err_msg=c["id"])
            np.testing.assert_allclose(wi, c["expected"]["weights"], rtol=1e-6, atol=1e-12, err_msg=c["id"])
            assert np.isclose(wi.sum(), 1.0)


def test_excess_mtl_libmtl_sequences(x64):
    method = _methods("libmtl_weightings.json")["ExcessMTL"]
    for c in method["cases"]:
        agg = excess_mtl(robust_step_size=method["constructor_args"]["robust_step_size"], convention="libmtl")
        steps = c["inputs"]["per_step"]
        ds = _scan_sequence(agg, [s["grads"] for s in steps])
        exp = c["expected"]["per_step"]
        np.testing.assert_allclose(
            ds, [e["combined_grad"] for e in exp], rtol=1e-6, atol=1e-12, err_msg=c["id"]
        )
        # Weights: ones at the first step, then summing to K.
        js = jnp.asarray([s["grads"] for s in steps])
        state = agg.init(js.shape[1], js.shape[2], js.dtype)

        def body(s, j):
            _, w, s = excess_mtl_step(j, s, robust_step_size=0.01, convention="libmtl")
            return s, w

        _, ws = jax.lax.scan(body, state, js)
        np.testing.assert_allclose(ws, [e["returned_weights"] for e in exp], rtol=1e-6, err_msg=c["id"])


def test_excess_mtl_nan_keeps_state(x64):
    agg = excess_mtl()
    state = agg.init(2, 3, jnp.float64)
    d, new = agg.update(jnp.asarray([[np.nan, 1.0, 0.0], [0.0, 1.0, 2.0]]), state)
    assert np.all(np.isnan(d))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- Nash-MTL

# ECOS (cvxpy defaults abstol = reltol = feastol = 1e-8) solves the references'
# subproblems only to those absolute tolerances on objective and constraints;
# on the recorded cases whose every solve ended "optimal" the reference weights
# are within 1e-5 relative of the exact solution (worst: the 1e3-scaled matrix,
# whose weights are ~1e-3 and so carry a relatively larger ECOS error).
_ECOS_RTOL = 1e-5
# ECOS's tolerances are absolute: on weights of order 1e-3 (the 1e3-scaled matrix) they leave
# an absolute error of about 1e-8, i.e. more than 1e-5 relative.
_ECOS_ATOL = 1e-7


def _all_optimal(statuses) -> bool:
    flat = statuses if statuses and isinstance(statuses[0], str) else [s for st in statuses for s in st]
    return all(s == "optimal" for s in flat)


def _nash_single(cases, convention, key="J"):
    for k, group in _groups(cases, lambda c: len(c["inputs"][key])).items():
        js = _padded(group, key)
        state = NashMTLState(jnp.ones((k,)), jnp.zeros((), jnp.int32))
        # lax.map, not vmap: a vmapped solver loop runs every case until the slowest converges.
        run = jax.jit(
            lambda js, state=state: jax.lax.map(lambda j: nash_mtl_step(j, state, convention=convention), js)
        )
        d, w, s = run(jnp.asarray(js))
        for i, c in enumerate(group):
            n = np.shape(c["inputs"][key])[1]
            assert np.all(np.asarray(d)[i, n:] == 0)
            yield c, np.asarray(d)[i, :n], np.asarray(w)[i], np.asarray(s.alpha)[i]


_EPS32 = float(np.finfo(np.float32).eps)


def _bargaining_cond(j, w):
    """Condition number of the bargaining system a * (G a) = 1 at the weights ``w`` (G normalised)."""
    g = j @ j.T
    g = g / np.linalg.norm(g)
    return float(np.linalg.cond(np.diag(g @ w) + np.diag(w) @ g))


def _update_atol(j, w, d):
    """The update's absolute error that weights accurate to _ECOS_RTOL allow.

    The update is ``d = c u`` with ``u = w @ J`` and ``c`` the norm rescaling; an error of
    rtol |w_k| in each weight moves ``d`` by up to rtol ||d|| sum_k |w_k| ||g_k|| / ||u||:
    large where the weighted rows cancel (K > n, rank-deficient Gramians), as the reference
    README advises for these methods.
    """
    u = np.linalg.norm(w @ j)
    return _ECOS_RTOL * np.linalg.norm(d) * np.sum(np.abs(w) * np.linalg.norm(j, axis=1)) / max(u, 1e-300)


def _check_nash_properties(c, j, d, w, alpha, max_norm=1.0):
    """What the method promises where the reference's solver failed or stopped inaccurate."""
    g = j @ j.T
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(w)) and np.all(alpha >= 0), c["id"]
    assert np.linalg.norm(d) <= max_norm * (1 + 1e-9), c["id"]
    b = alpha * (g @ alpha)
    if np.all(b > 1 - 1e-6):
        # Feasible CCP point: every task's directional derivative is positive (>= 1/alpha_i before scaling).
        assert np.all(j @ d > 0), c["id"]
    else:
        # No bargaining solution exists (0 is a non-negative combination of rows): the start is kept.
        np.testing.assert_array_equal(alpha, 1.0, err_msg=c["id"])


def test_nash_mtl_single_matches_torchjd(x64):
    compared = failed_ref = 0
    for c, d, w, alpha in _nash_single(_single(_torchjd("NashMTL")), "torchjd"):
        exp = c["expected"]
        j = np.asarray(c["inputs"]["J"])
        if "raises" in exp:  # the all-zero matrix: zero update, weights kept at ones
            np.testing.assert_array_equal(d, 0.0)
            np.testing.assert_array_equal(w, 1.0)
            continue
        if _all_optimal(exp["solver_statuses"]):
            np.testing.assert_allclose(w, exp["weights"], rtol=_ECOS_RTOL, atol=1e-12, err_msg=c["id"])
            atol = max(_ECOS_RTOL, _update_atol(j, np.asarray(exp["weights"]), np.asarray(exp["update"])))
            np.testing.assert_allclose(d, exp["update"], rtol=_ECOS_RTOL, atol=atol, err_msg=c["id"])
            compared += 1
        else:
            # unbounded / infeasible / raised / optimal_inaccurate / user_limit: the
            # reference's alpha is a solver artefact; check the method's promises instead.
            _check_nash_properties(c, j, d, w, alpha)
            if exp["solver_statuses"][0] == "unbounded":
                # Our answer there: the bargaining solution itself.
                np.testing.assert_allclose(alpha * (j @ j.T @ alpha), 1.0, rtol=1e-8, err_msg=c["id"])
            failed_ref += 1
    assert compared >= 20 and failed_ref >= 10


def test_nash_mtl_single_matches_libmtl(x64):
    compared = 0
    cases = _methods("libmtl_weightings.json")["Nash_MTL"]["cases"]
    for c, d, w, _alpha in _nash_single(cases, "libmtl", "grads"):
        exp = c["expected"]
        if "raises" in exp or not _all_optimal(exp["solver_statuses"]):
            continue  # same solver-failure cases as torchjd's, checked there
        j = np.asarray(c["inputs"]["grads"])
        w_ref, d_ref = np.asarray(exp["returned_weights"]), np.asarray(exp["combined_grad"])
        # LibMTL casts alpha to float32 between its solves: a rounding of eps32 that the bargaining
        # system's conditioning amplifies (most where K > n), on top of ECOS's own tolerance.
        rtol = max(_ECOS_RTOL, _bargaining_cond(j, w_ref) * _EPS32)
        np.testing.assert_allclose(w, w_ref, rtol=rtol, atol=_ECOS_ATOL, err_msg=c["id"])
        atol = max(rtol, rtol / _ECOS_RTOL * _update_atol(j, w_ref, d_ref))
        np.testing.assert_allclose(d, d_ref, rtol=rtol, atol=atol, err_msg=c["id"])
        # clip_grad_norm_ leaves the norm just below max_norm where it clips, as LibMTL's does.
        assert np.linalg.norm(d) <= max(1.0, np.linalg.norm(d_ref) * (1 + rtol)), c["id"]
        compared += 1
    assert compared >= 20


def _nash_scan(js, convention):
    js = jnp.asarray(js)
    state = NashMTLState(jnp.ones((js.shape[1],)), jnp.zeros((), jnp.int32))

    def body(s, j):
        d, w, s = nash_mtl_step(j, s, convention=convention)
        return s, (d, w)

    return [np.asarray(x) for x in jax.jit(lambda s, js: jax.lax.scan(body, s, js)[1])(state, js)]


def test_nash_mtl_sequences(x64):
    for c in _sequences(_torchjd("NashMTL")):
        seq = np.asarray(c["inputs"]["J_sequence"])
        d, w = _nash_scan(seq, "torchjd")
        statuses = c["expected"]["solver_statuses"]
        for t, st in enumerate(statuses):
            if not _all_optimal([st]) and st != ["infeasible"]:
                # The reference's state is an artefact of an inaccurate solve from here on.
                for u in range(t, len(statuses)):
                    assert np.all(np.isfinite(d[u])) and np.all(w[u] >= 0)
                    assert np.linalg.norm(d[u]) <= 1.0 + 1e-9
                    assert np.all(seq[u] @ d[u] > 0), (
                        f"{c['id']} step {u}"
                    )  # full-rank rows: all tasks descend
                break
            # "infeasible" steps are truly infeasible here (0 in the cone of the rows): both keep alpha.
            np.testing.assert_allclose(
                w[t], c["expected"]["weights"][t], rtol=_ECOS_RTOL, err_msg=f"{c['id']} step {t}"
            )
            np.testing.assert_allclose(d[t], c["expected"]["updates"][t], rtol=_ECOS_RTOL, atol=_ECOS_RTOL)
    for c in _methods("libmtl_weightings.json")["Nash_MTL-seq"]["cases"]:
        steps, exp = c["inputs"]["per_step"], c["expected"]["per_step"]
        d, w = _nash_scan([s["grads"] for s in steps], "libmtl")
        for t, e in enumerate(exp):
            if not _all_optimal(e["solver_statuses"]):
                # From an inaccurate solve on, the reference's warm start is a solver artefact.
                assert np.all(np.isfinite(d[t:])) and np.all(np.linalg.norm(d[t:], axis=1) <= 1.0)
                break
            np.testing.assert_allclose(
                w[t], e["returned_weights"], rtol=_ECOS_RTOL, atol=_ECOS_ATOL, err_msg=c["id"]
            )
            np.testing.assert_allclose(d[t], e["combined_grad"], rtol=_ECOS_RTOL, atol=_ECOS_RTOL)
        assert t >= 1


def _bench_jacobian(k: int, n: int, seed: int = 0, row_scales=(1.0, 10.0, 0.1)) -> np.ndarray:
    """``benchmarks/bench_torchjd.py``'s float32 Jacobian (that module needs torch to import)."""
    rng = np.random.default_rng([seed, k, n])
    scales = np.asarray(row_scales, dtype=np.float64)[np.arange(k) % len(row_scales)]
    return (rng.standard_normal((k, n)) * scales[:, None]).astype(np.float32)


def _bargaining_point_scipy(g: np.ndarray) -> np.ndarray:
    """``a > 0`` with ``a_i (G a)_i = 1``: scipy's trust-exact on ``a^T G a / 2 - sum log a`` in ``log a``."""

    def parts(u):
        a = np.exp(u)
        ga = g @ a
        return a @ ga / 2 - np.sum(u), a * ga - 1, a[:, None] * g * a[None, :] + np.diag(a * ga)

    u = minimize(
        lambda u: parts(u)[0],
        np.zeros(len(g)),
        jac=lambda u: parts(u)[1],
        hess=lambda u: parts(u)[2],
        method="trust-exact",
        options={"gtol": 1e-13},
    ).x
    return np.exp(u)


def test_nash_mtl_large_n_is_the_ccp_fixed_point(x64):
    # RESULTS §5's K = 8, n = 8,577 Jacobian, where torchjd's ECOS solves all end "optimal_inaccurate".
    # The released CCP decreases F(a) = 1^T Gn a + (sum log a + sum log Gn a) / nf over
    # {a_i (G a)_i >= 1}; solved exactly it ends here at a KKT point with one task's constraint
    # inactive, below F at the bargaining point (which torchjd's stalled solves stay near).
    j = _bench_jacobian(8, 8577).astype(np.float64)
    g = j @ j.T
    state = NashMTLState(jnp.ones((8,)), jnp.zeros((), jnp.int32))
    alpha = np.asarray(jax.jit(nash_mtl_step)(jnp.asarray(j), state)[2].alpha)
    nf = np.linalg.norm(g)
    gn = g / nf
    # The subproblem linearised at alpha is solved by alpha: KKT with multipliers from scipy's nnls.
    c = gn.sum(axis=1) + (1 / alpha + gn @ (1 / (gn @ alpha))) / nf
    h = np.log(alpha * nf) + np.log(gn @ alpha)
    grad_h = np.diag(1 / alpha) + gn / (gn @ alpha)[None, :]  # column i is grad h_i
    active = h < 1e-8
    lam, residual = nnls(grad_h[:, active], c)
    assert np.all(h > -1e-12) and np.all(h[~active] > 1.0) and np.any(~active)
    assert residual <= 1e-9 * np.linalg.norm(c) and np.all(lam > 0)
    b = _bargaining_point_scipy(g)
    np.testing.assert_allclose(b * (g @ b), 1.0, rtol=1e-9)

    def objective(a):
        return np.sum(gn @ a) + (np.sum(np.log(a)) + np.sum(np.log(gn @ a))) / nf

    assert objective(alpha) < objective(b) - 1e-3 * abs(objective(b))


def test_nash_mtl_rejects_bad_config():
    with pytest.raises(ValueError, match="max_norm"):
        nash_mtl(max_norm=-1.0)
    with pytest.raises(ValueError, match="optim_niter"):
        nash_mtl(optim_niter=0)
    with pytest.raises(ValueError, match="convention"):
        nash_mtl(convention="x")
    agg = nash_mtl(n_tasks=3)
    with pytest.raises(ValueError, match="n_tasks=3"):
        agg.init(2, 5)
    with pytest.raises(ValueError, match="tau"):
        pcd(tau=2.0)
    with pytest.raises(ValueError, match="beta"):
        pcd(beta=1.0)
    with pytest.raises(ValueError, match="tau"):
        a = pcd(tau=[0.1, 0.2])
        a.update(jnp.ones((2, 3)), a.init(2, 3))
    with pytest.raises(ValueError, match="robust_step_size"):
        excess_mtl(robust_step_size=0.0)
    with pytest.raises(ValueError, match="n_warmup_steps"):
        excess_mtl(n_warmup_steps=2, convention="libmtl")
    with pytest.raises(TypeError, match="keeps state"):
        excess_mtl()(jnp.ones((2, 3)))


def test_nash_mtl_float32_and_nan(x64):
    # float32 reaches float64's answer: the subproblem's solution is the bargaining point, found
    # by damped Newton and certified by its KKT multipliers, with no barrier path in between.
    agg = nash_mtl()
    j = np.asarray(_torchjd("NashMTL")[0]["inputs"]["J"])
    with jax.enable_x64(False):
        d32, _ = jax.jit(agg.update)(jnp.asarray(j, jnp.float32), agg.init(2, 5, jnp.float32))
    update = jax.jit(agg.update)  # one compile for both float64 calls
    d64, s64 = update(jnp.asarray(j), agg.init(2, 5, jnp.float64))
    np.testing.assert_allclose(d32, d64, rtol=1e-3, atol=1e-4)
    d, s = update(jnp.asarray(j).at[0, 0].set(jnp.nan), s64)
    assert np.all(np.isnan(d))
    np.testing.assert_array_equal(s.alpha, s64.alpha)
    assert int(s.step) == int(s64.step)


def test_nash_mtl_update_weights_every(x64):
    agg = nash_mtl(update_weights_every=2)
    rng = np.random.default_rng(0)
    js = jnp.asarray(rng.normal(size=(3, 3, 6)))
    state = agg.init(3, 6, jnp.float64)
    update = jax.jit(agg.update)  # one compile for the three steps
    _, s1 = update(js[0], state)
    _, s2 = update(js[1], s1)  # reuses alpha
    np.testing.assert_array_equal(s1.alpha, s2.alpha)
    _, s3 = update(js[2], s2)
    assert not np.allclose(s3.alpha, s2.alpha)
