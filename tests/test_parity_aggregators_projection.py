"""Parity of ConFIG, TrimmedMean, Krum, PCGrad, GradVac and GradDrop with torchjd 0.18.0 and LibMTL.

References: ``tests/data/torchjd_aggregators.json`` (torchjd 0.18.0, float64) and
``tests/data/libmtl_weightings.json`` (LibMTL git 4336804); README §2. Random methods are fed
the draws the references recorded (PCGrad/GradVac orders, GradDrop uniforms). Every method is
jitted once per (K, n) group and vmapped over its cases; sequences run under one ``lax.scan``.

Tolerances (float64): the algorithms are the same, so ``rtol=1e-6``; where an update is made of
cancelling terms (g / -g, the 120-degree triple: the reference's update is about 1e-12 while
its terms are O(1)), rounding alone moves it by a few ulps of the terms, so the update also gets
``atol = 1e-12 * sum_k ||g_k||`` (rounding-level for O(1) rows, far below any real difference).
Krum's weights are one-hot and compared exactly (its tie rule replays torch's selection).
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

from softadapt_jax.gradients.aggregators import config as config_mod
from softadapt_jax.gradients.aggregators import graddrop as graddrop_mod
from softadapt_jax.gradients.aggregators import gradvac as gradvac_mod
from softadapt_jax.gradients.aggregators import krum as krum_mod
from softadapt_jax.gradients.aggregators import pcgrad as pcgrad_mod
from softadapt_jax.gradients.aggregators import trimmed_mean as trimmed_mean_mod
from softadapt_jax.gradients.aggregators._core import gramian_of

DATA = pathlib.Path(__file__).parent / "data"
RTOL = 1e-6
CANCEL = 1e-12


@functools.cache
def _methods(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())["methods"]


def torchjd(method: str) -> dict[str, Any]:
    return _methods("torchjd_aggregators.json")[method]


def libmtl(method: str) -> dict[str, Any]:
    return _methods("libmtl_weightings.json")[method]


def groups(cases: list[dict[str, Any]], field: str = "J") -> list[list[dict[str, Any]]]:
    """Single-step cases grouped by the shape of ``inputs[field]``."""
    out: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for case in cases:
        if case["kind"] != "sequence":
            out.setdefault(np.shape(case["inputs"][field]), []).append(case)
    return list(out.values())


def check_update(got: Any, want: Any, js: Any, ids: list[str], weights: Any = None) -> None:
    """Updates at RTOL; atol per the module docstring (and ``RTOL * sum_k |w_k| ||g_k||`` for weightings)."""
    for t, (g, w, j, cid) in enumerate(zip(got, want, js, ids, strict=True)):
        norms = np.linalg.norm(j, axis=1)
        atol = CANCEL * float(np.sum(norms))
        if weights is not None:
            atol = max(atol, RTOL * float(np.abs(weights[t]) @ norms))
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=atol, err_msg=cid)


def by_k(cases: list[dict[str, Any]], field: str = "J") -> list[list[dict[str, Any]]]:
    """Single-step cases grouped by K alone (Gramian rules, or Jacobians zero-padded to a common n)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for case in cases:
        if case["kind"] != "sequence":
            out.setdefault(len(case["inputs"][field]), []).append(case)
    return list(out.values())


def padded(mats: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Jacobians [K, n_c] zero-padded to the largest n (a zero column changes no other column here)."""
    n = max(m.shape[-1] for m in mats)
    out = np.zeros((len(mats), *mats[0].shape[:-1], n))
    for t, m in enumerate(mats):
        out[t, ..., : m.shape[-1]] = m
    return out, [m.shape[-1] for m in mats]


def others_orders(perms: np.ndarray) -> np.ndarray:
    """torchjd GradVac's randperm(K-1) rows (positions in the list of other tasks) as task indices."""
    k = perms.shape[0]
    others = np.array([[t for t in range(k) if t != i] for i in range(k)], int).reshape(k, k - 1)
    return np.take_along_axis(others, perms.astype(int), axis=1)


# --- ConFIG, TrimmedMean, Krum ------------------------------------------------------------------------


def test_constructor_args() -> None:
    assert torchjd("ConFIG")["constructor_args"] == {"pref_vector": None}
    assert torchjd("TrimmedMean")["constructor_args"] == {"trim_number": 1}
    assert torchjd("Krum")["constructor_args"] == {"n_byzantine": 1, "n_selected": 1}
    assert torchjd("GradVac")["constructor_args"] == {"beta": 0.5, "eps": 1e-8}
    assert torchjd("GradDrop")["constructor_args"] == {"f": "identity", "leak": None}
    assert torchjd("PCGrad")["constructor_args"] == {}


def test_config_matches_torchjd(x64) -> None:
    # Cases grouped by (n, max(K, n)) and zero rows appended up to the group's largest K: a zero
    # row has a zero unit vector, so it adds nothing to pinv(U) p or to the length, and the
    # pseudo-inverse's cutoff max(K, n) * eps is the same for every case of a group.
    run = jax.jit(jax.vmap(config_mod.config()))
    grouped: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for c in torchjd("ConFIG")["cases"]:
        k, n = np.shape(c["inputs"]["J"])
        grouped.setdefault((n, max(k, n)), []).append(c)
    for group in grouped.values():
        js = [reference_array(c["inputs"]["J"]) for c in group]
        kmax = max(j.shape[0] for j in js)
        pad = np.stack([np.vstack([j, np.zeros((kmax - j.shape[0], j.shape[1]))]) for j in js])
        want = [reference_array(c["expected"]["update"]) for c in group]
        check_update(np.asarray(run(jnp.asarray(pad))), want, js, [c["id"] for c in group])


def test_trimmed_mean_matches_torchjd(x64) -> None:
    run = jax.jit(jax.vmap(trimmed_mean_mod.trimmed_mean(trim_number=1)))
    for group in by_k(torchjd("TrimmedMean")["cases"]):
        js = [reference_array(c["inputs"]["J"]) for c in group]
        got = np.asarray(run(jnp.asarray(padded(js)[0])))
        for g, j, c in zip(got, js, group, strict=True):
            check_update([g[: j.shape[1]]], [reference_array(c["expected"]["update"])], [j], [c["id"]])


def test_krum_matches_torchjd(x64) -> None:
    agg = krum_mod.krum(n_byzantine=1)
    rule = jax.jit(jax.vmap(agg.weighting))
    for group in by_k(torchjd("Krum")["cases"]):
        js = [reference_array(c["inputs"]["J"]) for c in group]
        w = np.asarray(rule(jnp.stack([gramian_of(jnp.asarray(j)) for j in js])))
        # One-hot weights: exact equality, ties included (torch's nth_element replayed).
        np.testing.assert_array_equal(w, np.stack([reference_array(c["expected"]["weights"]) for c in group]))
        check_update(
            [wi @ j for wi, j in zip(w, js, strict=True)],
            [reference_array(c["expected"]["update"]) for c in group],
            js,
            [c["id"] for c in group],
        )


# --- PCGrad ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["torchjd", "libmtl"])
def test_pcgrad_replays_references(x64, convention: str) -> None:
    # pcgrad_direction's weights are combiners.pcgrad_weights on the Gramian: padding J with zero
    # columns leaves the Gramian unchanged, so one compile per K.
    run = jax.jit(jax.vmap(functools.partial(pcgrad_mod.pcgrad_direction, convention=convention)))
    ref = torchjd("PCGrad") if convention == "torchjd" else libmtl("PCGrad")
    field = "J" if convention == "torchjd" else "grads"
    for group in by_k(ref["cases"], field):
        js = [reference_array(c["inputs"][field]) for c in group]
        if convention == "torchjd":
            orders = np.stack([np.array(c["expected"]["draws"]["randperm"], int) for c in group])
            want_d = [reference_array(c["expected"]["update"]) for c in group]
            want_w = np.stack([reference_array(c["expected"]["weights"]) for c in group])
        else:
            orders = np.stack([np.array([d["after"] for d in c["expected"]["draws"]], int) for c in group])
            want_d = [reference_array(c["expected"]["combined_grad"]) for c in group]
            want_w = np.stack([reference_array(c["expected"]["returned_weights"]) for c in group])
        pad, ns = padded(js)
        d, w = run(jnp.asarray(pad), jnp.asarray(orders))
        w = np.asarray(w)
        np.testing.assert_allclose(w, want_w, rtol=RTOL, atol=1e-12)
        check_update(
            [x[:n] for x, n in zip(np.asarray(d), ns, strict=True)], want_d, js, [c["id"] for c in group], w
        )


# --- GradVac ---------------------------------------------------------------------------------------------


def test_gradvac_single_steps_replay_torchjd(x64) -> None:
    def one(j, orders):
        k = j.shape[0]
        w, _ = gradvac_mod.gradvac_weights(gramian_of(j), jnp.zeros((k, k), j.dtype), orders)
        return w @ j, w

    run = jax.jit(jax.vmap(one))
    for group in by_k(torchjd("GradVac")["cases"]):
        js = [reference_array(c["inputs"]["J"]) for c in group]
        pad, ns = padded(js)
        orders = np.stack([others_orders(np.array(c["expected"]["draws"]["randperm"])) for c in group])
        d, w = run(jnp.asarray(pad), jnp.asarray(orders))
        w = np.asarray(w)
        np.testing.assert_allclose(
            w, np.stack([reference_array(c["expected"]["weights"]) for c in group]), rtol=RTOL, atol=1e-12
        )
        check_update(
            [x[:n] for x, n in zip(np.asarray(d), ns, strict=True)],
            [reference_array(c["expected"]["update"]) for c in group],
            js,
            [c["id"] for c in group],
            w,
        )


def test_gradvac_sequences_replay_torchjd(x64) -> None:
    seqs = [c for c in torchjd("GradVac")["cases"] if c["kind"] == "sequence"]
    assert len(seqs) == 3

    def run_seq(js, orders):
        k = js.shape[1]

        def step(phi, xs):
            j, o = xs
            w, phi = gradvac_mod.gradvac_weights(gramian_of(j), phi, o)
            return phi, (w @ j, w)

        return jax.lax.scan(step, jnp.zeros((k, k), js.dtype), (js, orders))[1]

    run = jax.jit(run_seq)
    for case in seqs:
        js = reference_array(case["inputs"]["J_sequence"])
        orders = np.stack([others_orders(np.array(d["randperm"])) for d in case["expected"]["draws"]])
        d, w = run(jnp.asarray(js), jnp.asarray(orders))
        np.testing.assert_allclose(
            w, reference_array(case["expected"]["weights"]), rtol=RTOL, atol=1e-12, err_msg=case["id"]
        )
        check_update(
            np.asarray(d),
            reference_array(case["expected"]["updates"]),
            js,
            [case["id"]] * len(js),
            np.asarray(w),
        )


def _libmtl_orders(draws: list[dict[str, Any]]) -> np.ndarray:
    return np.array([d["after"] for d in draws], int).reshape(len(draws), len(draws) - 1)


def test_gradvac_libmtl_single_steps(x64) -> None:
    def one(j, orders):
        k = j.shape[0]
        return gradvac_mod.gradvac_direction_libmtl(j, jnp.zeros((k, k), j.dtype), orders)[0]

    run = jax.jit(jax.vmap(one))
    for group in by_k(libmtl("GradVac")["cases"], "grads"):
        js = [reference_array(c["inputs"]["grads"]) for c in group]
        pad, ns = padded(js)
        orders = np.stack([_libmtl_orders(c["expected"]["draws"]) for c in group])
        d = np.asarray(run(jnp.asarray(pad), jnp.asarray(orders)))
        want = [reference_array(c["expected"]["combined_grad"]) for c in group]
        # LibMTL returns no usable weights, so only the rounding-level cancellation atol applies.
        check_update([x[:n] for x, n in zip(d, ns, strict=True)], want, js, [c["id"] for c in group])
        np.testing.assert_array_equal(
            np.stack([reference_array(c["expected"]["returned_weights"]) for c in group]), 1.0
        )


def test_gradvac_libmtl_sequences(x64) -> None:
    cases = libmtl("GradVac-seq")["cases"]
    assert libmtl("GradVac-seq")["constructor_args"] == {"GradVac_beta": 0.5, "GradVac_group_type": 0}
    agg = gradvac_mod.gradvac(convention="libmtl")

    def run_seq(js, orders):
        def step(phi, xs):
            j, o = xs
            d, phi = gradvac_mod.gradvac_direction_libmtl(j, phi, o)
            return phi, (d, phi)

        return jax.lax.scan(step, agg.init(js.shape[1], js.shape[2], js.dtype).phi_hat, (js, orders))[1]

    run = jax.jit(run_seq)
    for case in cases:
        steps, exp = case["inputs"]["per_step"], case["expected"]["per_step"]
        js = np.stack([reference_array(s["grads"]) for s in steps])
        orders = np.stack([_libmtl_orders(e["draws"]) for e in exp])
        d, phi = run(jnp.asarray(js), jnp.asarray(orders))
        check_update(
            np.asarray(d),
            np.stack([reference_array(e["combined_grad"]) for e in exp]),
            js,
            [case["id"]] * len(js),
        )
        np.testing.assert_allclose(
            phi, np.stack([reference_array(e["rho_T"]) for e in exp]), rtol=RTOL, atol=1e-12
        )


# --- GradDrop --------------------------------------------------------------------------------------------


def test_graddrop_replays_torchjd(x64) -> None:
    run = jax.jit(jax.vmap(graddrop_mod.graddrop_direction))
    for group in by_k(torchjd("GradDrop")["cases"]):
        js = [reference_array(c["inputs"]["J"]) for c in group]
        pad, ns = padded(js)
        u = padded([reference_array(c["expected"]["draws"]["rand"]) for c in group])[0]
        got = np.asarray(run(jnp.asarray(pad), jnp.asarray(u)))
        want = [reference_array(c["expected"]["update"]) for c in group]
        check_update([x[:n] for x, n in zip(got, ns, strict=True)], want, js, [c["id"] for c in group])


def test_graddrop_rep_grad_replays_libmtl(x64) -> None:
    by_shape: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for c in libmtl("GradDrop")["cases"]:
        by_shape.setdefault(
            (np.shape(c["inputs"]["per_task_rep_grads"]), np.shape(c["inputs"]["x"])), []
        ).append(c)
    run = jax.jit(jax.vmap(lambda g, r, u, lk: graddrop_mod.graddrop_rep_grad(g, r, u, leak=lk)))
    for group in by_shape.values():
        grads = np.stack([reference_array(c["inputs"]["per_task_rep_grads"]) for c in group])
        x = np.stack([reference_array(c["inputs"]["x"]) for c in group])
        rep = np.einsum(
            "cbi,cdi->cbd", x, np.stack([reference_array(c["inputs"]["encoder_weight"]) for c in group])
        )
        np.testing.assert_allclose(
            rep, np.stack([reference_array(c["expected"]["rep"]) for c in group]), rtol=1e-12, atol=1e-14
        )
        u = np.stack([reference_array(c["expected"]["draws"][0]["value"]) for c in group])
        leak = np.array([c["kwargs"]["leak"] for c in group])
        got = np.asarray(run(jnp.asarray(grads), jnp.asarray(rep), jnp.asarray(u), jnp.asarray(leak)))
        for g, xx, c in zip(got, x, group, strict=True):
            np.testing.assert_allclose(
                g, reference_array(c["expected"]["rep_backward_grad"]), rtol=RTOL, atol=1e-12, err_msg=c["id"]
            )
            np.testing.assert_allclose(
                g.T @ xx,
                reference_array(c["expected"]["shared_param_grad"]),
                rtol=RTOL,
                atol=1e-12,
                err_msg=c["id"],
            )


# --- properties and errors -------------------------------------------------------------------------------


def test_random_aggregators_draw_from_key_and_vmap_equals_loop(x64) -> None:
    rng = np.random.default_rng(0)
    js = jnp.asarray(rng.standard_normal((2, 3, 6)))
    keys = jax.random.split(jax.random.key(1), 2)
    for agg in (pcgrad_mod.pcgrad(), graddrop_mod.graddrop()):
        one = jax.jit(lambda j, k, a=agg: a(j, key=k))
        batched = jax.jit(jax.vmap(one))(js, keys)
        for t in range(2):
            np.testing.assert_allclose(batched[t], one(js[t], keys[t]), rtol=1e-12)


def test_gradvac_conventions_agree_and_nan_keeps_state(x64) -> None:
    rng = np.random.default_rng(2)
    j = jnp.asarray(rng.standard_normal((4, 7)))
    key = jax.random.key(3)
    a, b = gradvac_mod.gradvac(), gradvac_mod.gradvac(convention="libmtl")
    sa = sb = a.init(4, 7, jnp.float64)
    ua, ub = jax.jit(a.update), jax.jit(b.update)
    for _ in range(3):
        da, sa = ua(j, sa, key=key)
        db, sb = ub(j, sb, key=key)
        np.testing.assert_allclose(da, db, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sa.phi_hat, sb.phi_hat, rtol=1e-9, atol=1e-12)
    d, s2 = ua(j.at[0, 0].set(jnp.nan), sa, key=key)
    assert bool(jnp.any(jnp.isnan(d)))
    np.testing.assert_array_equal(s2.phi_hat, sa.phi_hat)


def test_krum_selects_n_selected_rows_and_ignores_a_common_scale(x64) -> None:
    j = jnp.asarray(np.random.default_rng(4).standard_normal((7, 5)))
    rule = jax.jit(functools.partial(krum_mod.krum_weights, n_byzantine=2, n_selected=3))
    w = rule(gramian_of(j))
    assert float(jnp.sum(w)) == pytest.approx(1.0) and int(jnp.sum(w > 0)) == 3
    w2 = rule(gramian_of(4.0 * j))
    np.testing.assert_array_equal(w, w2)


def test_config_and_trimmed_mean_properties(x64) -> None:
    j = jnp.asarray(np.random.default_rng(5).standard_normal((3, 8)))
    d = config_mod.config_direction(j)
    units = j / jnp.linalg.norm(j, axis=1, keepdims=True)
    cos = units @ d / jnp.linalg.norm(d)
    np.testing.assert_allclose(cos, cos[0], rtol=1e-10)  # equal angle with every gradient
    np.testing.assert_array_equal(config_mod.config_direction(jnp.zeros((3, 4))), 0.0)
    np.testing.assert_allclose(trimmed_mean_mod.trimmed_mean_direction(j, 0), jnp.mean(j, axis=0), rtol=1e-14)
    d32 = config_mod.config()(j.astype(jnp.float32))
    assert d32.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(d32)))


def test_graddrop_zero_column_and_leak_one(x64) -> None:
    j = jnp.asarray([[1.0, 0.0, -2.0], [-3.0, 0.0, 1.0]])
    u = jnp.asarray([0.3, 0.5, 0.9])
    d = graddrop_mod.graddrop_direction(j, u)
    assert bool(jnp.all(jnp.isfinite(d))) and float(d[1]) == 0.0
    np.testing.assert_allclose(graddrop_mod.graddrop_direction(j, u, leak=[1.0, 1.0]), jnp.sum(j, axis=0))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: trimmed_mean_mod.trimmed_mean(trim_number=1)(jnp.ones((2, 3))), "2 \\* trim_number \\+ 1"),
        (lambda: trimmed_mean_mod.trimmed_mean(trim_number=-1), "trim_number"),
        (lambda: krum_mod.krum(n_byzantine=1)(jnp.ones((3, 2))), "n_byzantine \\+ 3"),
        (lambda: krum_mod.krum(n_byzantine=0, n_selected=5)(jnp.ones((4, 2))), "n_selected"),
        (lambda: krum_mod.krum_weights(jnp.ones((3, 4)), n_byzantine=0), "square"),
        (lambda: config_mod.config(pref_vector=[1.0, 2.0])(jnp.ones((3, 2))), "pref_vector"),
        (lambda: config_mod.config(pref_vector=[[1.0]]), "pref_vector"),
        (lambda: pcgrad_mod.pcgrad(convention="x"), "convention"),
        (lambda: pcgrad_mod.pcgrad()(jnp.ones((2, 3))), "draws random numbers"),
        (lambda: pcgrad_mod.pcgrad_direction(jnp.ones((2, 3)), jnp.zeros((2, 3), int)), "orders"),
        (lambda: gradvac_mod.gradvac(beta=1.5), "beta"),
        (lambda: gradvac_mod.gradvac(eps=-1.0), "eps"),
        (
            lambda: gradvac_mod.gradvac_weights(jnp.eye(3), jnp.zeros((3, 3)), jnp.zeros((3, 3), int)),
            "orders",
        ),
        (
            lambda: gradvac_mod.gradvac_weights(jnp.eye(3), jnp.zeros((2, 2)), jnp.zeros((3, 2), int)),
            "phi_hat",
        ),
        (lambda: graddrop_mod.graddrop(leak=[0.1, 0.2])(jnp.ones((3, 2)), key=jax.random.key(0)), "leak"),
        (lambda: graddrop_mod.graddrop_direction(jnp.ones((2, 3)), jnp.ones(2)), "uniforms"),
        (
            lambda: graddrop_mod.graddrop_rep_grad(jnp.ones((2, 3)), jnp.ones((3,)), jnp.ones(3)),
            "per_task_rep_grads",
        ),
        (lambda: graddrop_mod.graddrop_rep_grad(jnp.ones((2, 4, 3)), jnp.ones((4, 2)), jnp.ones(3)), "rep"),
    ],
)
def test_errors_name_the_argument(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_gradvac_state_type_error() -> None:
    with pytest.raises(TypeError, match="GradVacState"):
        gradvac_mod.gradvac().update(jnp.ones((2, 3)), (), key=jax.random.key(0))
