"""Parity of ``convention="torchjd"`` of PCGrad, MGDA and CAGrad with torchjd 0.18.0 (and its Sum).

The reference (``tests/data/torchjd_aggregators.json``, README §2) applied each
aggregator once to each of 61 matrices J [K, n] in float64 and recorded the
update and the weights, with ``update == weights @ J``. Our weight rules see
only the Gramian ``J J^T``, so each rule is jitted once per K and vmapped over
all the cases with that K; the update is then ``weights @ J``.

Tolerances (float64):

* PCGrad, MGDA (the same algorithms, replayed iteration for iteration, with
  torchjd's recorded ``randperm`` draws for PCGrad): ``rtol=1e-6`` on the
  weights and the update, plus ``atol = 1e-6 * sum_k |w_k| ||g_k||`` on the
  update (an rtol of 1e-6 on the weights moves an update made of cancelling
  terms by that much; the references' exact-cancellation cases have updates
  of about 1e-13). MGDA's Frank-Wolfe stops by a tolerance (``epsilon=1e-3``)
  on its step length, so cases where rounding decides a branch of the
  iteration are ill-conditioned: a perturbation of J by one part in 1e15
  moves our own weights by more than 1e-6. There only the properties are
  checked (weights on the simplex, the min-norm objective within torchjd's
  accuracy of the reference's).
* CAGrad (torchjd solves the dual with CLARABEL, default gap tolerance 1e-8,
  we with an interior-point method to a gap of 1e-12): (a) the coefficient
  formula applied to torchjd's own dual solution reproduces its weights at
  ``rtol=1e-6``; (b) our dual objective is no worse than torchjd's and within
  CLARABEL's 1e-8 of it; (c) the update agrees to 1e-3 relative: an objective
  known to 1e-8 pins the minimiser only to about sqrt(1e-8) = 1e-4 along flat
  directions of the dual, and the update moves with it. Where torchjd returns
  zeros (Pareto-stationary, or tr(J J^T) < 1e-4: the tiny-J cases), ours must
  be exactly zero too.
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

from softadapt_jax.gradients import (
    cagrad_coefficients,
    cagrad_weights,
    mgda,
    mgda_weights,
    pcgrad,
    pcgrad_weights,
)

DATA = pathlib.Path(__file__).parent / "data" / "torchjd_aggregators.json"
RTOL = 1e-6
CLARABEL_GAP = 1e-8  # CLARABEL's default tol_gap_abs / tol_gap_rel
OUR_GAP = 1e-12  # cagrad_weights' default duality gap
PERTURBATION = 1e-15


@functools.cache
def _methods() -> dict[str, Any]:
    return json.loads(DATA.read_text())["methods"]


def cases(method: str) -> list[dict[str, Any]]:
    return _methods()[method]["cases"]


def by_k(method: str) -> dict[int, list[dict[str, Any]]]:
    """The cases of ``method`` grouped by K (the weight rules see only the [K, K] Gramian)."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for case in cases(method):
        groups.setdefault(len(case["inputs"]["J"]), []).append(case)
    return groups


def jac(case: dict[str, Any]) -> np.ndarray:
    return reference_array(case["inputs"]["J"])


def expected(case: dict[str, Any], field: str) -> np.ndarray:
    return reference_array(case["expected"][field])


def grams(js: list[np.ndarray]) -> jax.Array:
    return jnp.asarray(np.stack([j @ j.T for j in js]))


def check_update(w: np.ndarray, j: np.ndarray, want: np.ndarray, label: str) -> None:
    """``w @ J`` against the reference with rtol, and the cancellation atol of the module docstring."""
    atol = RTOL * float(np.abs(w) @ np.linalg.norm(j, axis=1))
    np.testing.assert_allclose(w @ j, want, rtol=RTOL, atol=atol, err_msg=label)


def ill_conditioned(rule: Any, js: list[np.ndarray], w: np.ndarray, draws: int = 4) -> np.ndarray:
    """Cases where perturbing J by one part in 1e15 moves our own weights by more than RTOL."""
    rng = np.random.default_rng(0)
    moved = np.zeros(len(js), bool)
    for _ in range(draws):
        noisy = [j * (1 + PERTURBATION * rng.standard_normal(j.shape)) for j in js]
        wp = np.asarray(rule(grams(noisy)))
        moved |= np.any(np.abs(wp - w) > RTOL * np.abs(w) + 1e-12, axis=1)
    return moved


# --- jitted rules, one compile per K -------------------------------------------------------------------

PCGRAD = jax.jit(jax.vmap(functools.partial(pcgrad_weights, convention="torchjd")))
MGDA = jax.jit(jax.vmap(functools.partial(mgda_weights, convention="torchjd")))
CAGRAD = jax.jit(jax.vmap(lambda g: cagrad_weights(g, 0.5, convention="torchjd")))
CAGRAD_FROM_DUAL = jax.jit(jax.vmap(lambda g, w: cagrad_coefficients(g, w, 0.5, convention="torchjd")))


def test_constructor_args_are_the_defaults_we_reproduce() -> None:
    methods = _methods()
    assert methods["MGDA"]["constructor_args"] == {"epsilon": 1e-3, "max_iters": 100}
    assert methods["CAGrad"]["constructor_args"] == {"c": 0.5, "norm_eps": 1e-4}
    assert methods["PCGrad"]["constructor_args"] == {}


def test_sum_is_what_task_specific_leaves_get(x64) -> None:
    """torchjd's Sum: the combiners give leaves masked out as task-specific the plain sum over K."""
    tx = mgda(mask={"shared": True, "task": False})
    update = jax.jit(lambda u: tx.update(u, tx.init(None))[0]["task"])
    for case in cases("Sum"):
        j = jac(case)
        got = np.asarray(update({"shared": jnp.asarray(j[:, :1]), "task": jnp.asarray(j)}))
        np.testing.assert_allclose(got, expected(case, "update"), rtol=RTOL, atol=1e-15, err_msg=case["id"])
        np.testing.assert_array_equal(expected(case, "weights"), 1.0)


def test_pcgrad_replays_torchjd(x64) -> None:
    for k, group in by_k("PCGrad").items():
        js = [jac(c) for c in group]
        orders = jnp.asarray(np.stack([np.array(c["expected"]["draws"]["randperm"]) for c in group]))
        assert orders.shape == (len(group), k, k)
        w = np.asarray(PCGRAD(grams(js), orders))
        for case, wi, j in zip(group, w, js, strict=True):
            want = expected(case, "weights")
            np.testing.assert_allclose(wi, want, rtol=RTOL, atol=1e-12, err_msg=case["id"])
            check_update(wi, j, expected(case, "update"), case["id"])


def test_mgda_replays_torchjd_frank_wolfe(x64) -> None:
    checked = 0
    for group in by_k("MGDA").values():
        js = [jac(c) for c in group]
        w = np.asarray(MGDA(grams(js)))
        ill = ill_conditioned(MGDA, js, w)
        for case, wi, j, bad in zip(group, w, js, ill, strict=True):
            want = expected(case, "weights")
            if bad:
                g = j @ j.T
                assert np.all(wi >= 0) and abs(wi.sum() - 1) < 1e-12, case["id"]
                # Frank-Wolfe stops when its step is below epsilon: the objective is that accurate.
                assert abs(wi @ g @ wi - want @ g @ want) <= 1e-3 * np.max(np.diag(g)), case["id"]
                continue
            checked += 1
            np.testing.assert_allclose(wi, want, rtol=RTOL, atol=1e-12, err_msg=case["id"])
            check_update(wi, j, expected(case, "update"), case["id"])
    assert checked >= len(cases("MGDA")) // 2  # ill-conditioned cases are the exception


def _torchjd_objective(g: np.ndarray, w: np.ndarray) -> float:
    """torchjd's dual objective, on the trace-normalised Gramian (its reduced matrix R R^T)."""
    a = g / np.trace(g)
    b = np.full(len(g), 1 / len(g))
    return float(w @ a @ b + 0.5 * np.sqrt(b @ a @ b) * np.sqrt(max(w @ a @ w, 0.0)))


def test_cagrad_matches_torchjd_to_clarabels_accuracy(x64) -> None:
    zeros = 0
    for k, group in by_k("CAGrad").items():
        js = [jac(c) for c in group]
        gs = grams(js)
        ours = np.asarray(CAGRAD(gs))
        want = np.stack([expected(c, "weights") for c in group])
        stationary = np.all(want == 0, axis=1)
        # torchjd's own dual solution, from its weights 1/K + lam w (w on the simplex).
        dual = want - 1 / k
        dual = np.where(stationary[:, None], 1 / k, dual / np.where(stationary, 1.0, dual.sum(1))[:, None])
        from_dual = np.asarray(CAGRAD_FROM_DUAL(gs, jnp.asarray(dual)))
        for i, case in enumerate(group):
            label, j = case["id"], js[i]
            if stationary[i]:  # exact zero update: torchjd's Pareto-stationary branch
                zeros += 1
                np.testing.assert_array_equal(ours[i], 0.0, err_msg=label)
                np.testing.assert_array_equal(expected(case, "update"), 0.0, err_msg=label)
                continue
            np.testing.assert_allclose(from_dual[i], want[i], rtol=RTOL, err_msg=label)  # (a)
            g = j @ j.T
            f_ours = _torchjd_objective(g, (ours[i] - 1 / k) / np.sum(ours[i] - 1 / k))
            f_ref = _torchjd_objective(g, dual[i])
            assert f_ours <= f_ref + OUR_GAP, label  # (b)
            assert f_ref <= f_ours + CLARABEL_GAP, label
            atol = 1e-3 * np.abs(ours[i]) @ np.linalg.norm(j, axis=1)
            np.testing.assert_allclose(ours[i] @ j, expected(case, "update"), rtol=1e-3, atol=atol)  # (c)
    assert zeros > 0  # the recorded cases include the branch


def _rounding(coef: np.ndarray, gs: np.ndarray) -> float:
    """Rounding of a combination of cancelling gradients (our Gramians and sums differ in order)."""
    return 1e-12 * float(np.max(np.einsum("nk,nk->n", np.abs(coef), np.linalg.norm(gs, axis=2))))


@pytest.mark.parametrize("name", ["pcgrad", "mgda"])
def test_transform_applies_the_weight_rule(name: str, x64) -> None:
    """The optax transform with convention="torchjd" gives the rule's weights times J.

    (CAGrad's transform shares the same code path; test_parity_libmtl_gradients checks it.)
    """
    group = max(by_k("MGDA").values(), key=len)
    js = np.stack([jac(c) for c in group if jac(c).shape == jac(group[0]).shape])
    if name == "pcgrad":
        tx = pcgrad(random_order=False, convention="torchjd")
        k = js.shape[1]
        rule = jax.vmap(lambda g: pcgrad_weights(g, jnp.tile(jnp.arange(k), (k, 1)), convention="torchjd"))
    else:
        tx, rule = mgda(convention="torchjd"), MGDA
    got = jax.jit(jax.vmap(lambda j: tx.update({"p": j}, tx.init(None))[0]["p"]))(jnp.asarray(js))
    w = np.asarray(rule(grams(list(js))))
    want = np.einsum("nk,nkp->np", w, js)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=_rounding(w, js))
