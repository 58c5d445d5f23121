"""Parity of the defaults of PCGrad, MGDA and CAGrad with LibMTL (git 4336804).

The reference (``tests/data/libmtl_weightings.json``, README §2) ran each
LibMTL weighting once per matrix of gradients g [K, n] (float64) through its
own HPS architecture and recorded the shared parameter's ``combined_grad``
and the value ``backward()`` returned. Our weight rules see only the Gramian,
so each is jitted once per K and vmapped over the cases with that K.

Tolerances (float64):

* PCGrad (LibMTL's ``random.shuffle`` orders replayed) and MGDA (LibMTL's
  min-norm solver replayed iteration for iteration, for each ``mgda_gn``):
  ``rtol=1e-6`` on the weights and on ``combined_grad``, plus
  ``atol = 1e-6 * sum_k |c_k| ||g_k||`` on the latter (an rtol of 1e-6 on
  the coefficients moves a combination of cancelling gradients by that
  much). MGDA's solver stops by a tolerance, so cases where rounding decides
  its path are ill-conditioned: a perturbation of g by one part in 1e15
  moves our own weights by more than 1e-6; there only the properties are
  checked (weights on the simplex, the min-norm objective as small as the
  reference's, to the solver's stopping tolerance 1e-5).
* LibMTL's NaN cases (``mgda_gn`` "l2"/"loss+" with a zero gradient): our
  output is finite, the zero gradient normalised to zero, and the update the
  documented one: the min-norm point of a hull containing 0, i.e. at most
  0.001 times a unit vector (the two-point rule's clamp).
* CAGrad (LibMTL solves the dual with scipy's SLSQP, default ``ftol=1e-6``,
  an absolute tolerance on the objective): (a) the coefficient formula
  applied to LibMTL's own dual solution (its returned weights) reproduces
  ``combined_grad`` at the tolerances above; (b) our dual objective is never
  worse than SLSQP's (to our gap, 1e-12 times the Gramian's largest diagonal
  entry). Where SLSQP stopped without solving the problem (its answer worse
  than ours by more than its 1e-6), our update deliberately differs.
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
    cagrad,
    cagrad_coefficients,
    cagrad_weights,
    mgda,
    mgda_normalizers,
    mgda_weights,
    pcgrad,
    pcgrad_weights,
)

DATA = pathlib.Path(__file__).parent / "data" / "libmtl_weightings.json"
RTOL = 1e-6
OUR_GAP = 1e-12  # cagrad_weights' default duality gap, relative to max diag(G)
SLSQP_FTOL = 1e-6  # scipy's default, absolute
NORMALIZATIONS = {"MGDA": "none", "MGDA-l2": "l2", "MGDA-loss": "loss", "MGDA-loss+": "loss+"}


@functools.cache
def _methods() -> dict[str, Any]:
    return json.loads(DATA.read_text())["methods"]


def groups(method: str) -> list[list[dict[str, Any]]]:
    """The cases of ``method`` grouped by K (the weight rules see only the [K, K] Gramian)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for case in _methods()[method]["cases"]:
        out.setdefault(len(case["inputs"]["grads"]), []).append(case)
    return list(out.values())


def arrays(group: list[dict[str, Any]], where: str, field: str) -> list[np.ndarray]:
    return [reference_array(c[where][field]) for c in group]


def grams(gs: list[np.ndarray]) -> jax.Array:
    return jnp.asarray(np.stack([g @ g.T for g in gs]))


def check_combined(coef: np.ndarray, g: np.ndarray, want: np.ndarray, label: str) -> None:
    atol = RTOL * float(np.abs(coef) @ np.linalg.norm(g, axis=1))
    np.testing.assert_allclose(coef @ g, want, rtol=RTOL, atol=atol, err_msg=label)


# --- jitted rules, one compile per K (and normalisation) -----------------------------------------------

PCGRAD = jax.jit(jax.vmap(pcgrad_weights))
CAGRAD = jax.jit(jax.vmap(lambda g: cagrad_weights(g, 0.5)))
CAGRAD_FROM_DUAL = jax.jit(jax.vmap(lambda g, w: cagrad_coefficients(g, w, 0.5)))


MGDA = jax.jit(jax.vmap(mgda_weights))  # shared by every normalisation: they only change the Gramian


def libmtl_normalizers(norm: str, g: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """LibMTL's ``_gradient_normalizers`` (a zero norm is floored at 1e-20, our documented 0/0 := 0)."""
    l2 = np.maximum(np.linalg.norm(g, axis=1), 1e-20)
    return {"none": np.ones(len(g)), "l2": l2, "loss": loss, "loss+": np.maximum(loss * l2, 1e-20)}[norm]


def mgda_rule(norm: str, gs: list[np.ndarray], losses: np.ndarray) -> tuple[np.ndarray, ...]:
    """LibMTL's MGDA: the solver's weights w on the normalised Gramians, the coefficients w / n, and n."""
    n = np.stack([libmtl_normalizers(norm, g, lo) for g, lo in zip(gs, losses, strict=True)])
    w = np.asarray(MGDA(grams([g / ni[:, None] for g, ni in zip(gs, n, strict=True)])))
    return w, w / n, n


def test_constructor_args_are_the_defaults_we_reproduce() -> None:
    methods = _methods()
    assert methods["CAGrad"]["constructor_args"] == {"calpha": 0.5, "rescale": 1}
    for name, norm in NORMALIZATIONS.items():
        assert methods[name]["constructor_args"] == {"mgda_gn": norm}


def test_pcgrad_replays_libmtl(x64) -> None:
    for group in groups("PCGrad"):
        gs = arrays(group, "inputs", "grads")
        # LibMTL shuffles [0..K-1] once per task i, in order; "after" is the visiting order.
        orders = np.stack([[d["after"] for d in c["expected"]["draws"]] for c in group])
        k = orders.shape[1]
        assert all(
            d["fn"] == "random.shuffle" and d["before"] == list(range(k))
            for c in group
            for d in c["expected"]["draws"]
        )
        coef = np.asarray(PCGRAD(grams(gs), jnp.asarray(orders)))
        for case, c, g in zip(group, coef, gs, strict=True):
            want = np.array(case["expected"]["returned_weights"], np.float64)
            np.testing.assert_allclose(c, want, rtol=RTOL, atol=1e-12, err_msg=case["id"])
            check_combined(c, g, np.array(case["expected"]["combined_grad"]), case["id"])


def _perturbed_weights(norm: str, gs: list[np.ndarray], losses: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Cases where perturbing g by one part in 1e15 moves our own weights by more than RTOL."""
    rng = np.random.default_rng(0)
    moved = np.zeros(len(gs), bool)
    for _ in range(4):
        noisy = [g * (1 + 1e-15 * rng.standard_normal(g.shape)) for g in gs]
        moved |= np.any(np.abs(mgda_rule(norm, noisy, losses)[0] - w) > RTOL * np.abs(w) + 1e-12, axis=1)
    return moved


@pytest.mark.parametrize("method", sorted(NORMALIZATIONS))
def test_mgda_replays_libmtl(method: str, x64) -> None:
    norm = NORMALIZATIONS[method]
    checked = total = 0
    for group in groups(method):
        gs = arrays(group, "inputs", "grads")
        losses = np.stack(arrays(group, "inputs", "losses"))
        w, coef, n = mgda_rule(norm, gs, losses)
        # The library's normalisers are the ones replayed here.
        ours_n = jax.vmap(lambda g, lo: mgda_normalizers(g, norm, lo))(grams(gs), jnp.asarray(losses))
        np.testing.assert_allclose(ours_n, n, rtol=1e-12)
        ill = _perturbed_weights(norm, gs, losses, w)
        for i, case in enumerate(group):
            label, g = case["id"], gs[i]
            want = reference_array(case["expected"]["combined_grad"])
            total += 1
            assert np.all(np.isfinite(coef[i])) and np.all(w[i] >= 0), label
            np.testing.assert_allclose(w[i].sum(), 1.0, rtol=1e-12, err_msg=label)
            if not np.all(np.isfinite(want)):  # LibMTL: 0/0 for a zero gradient
                assert np.any(np.linalg.norm(g, axis=1) == 0), label
                assert np.linalg.norm(coef[i] @ g) <= 1e-3 + 1e-12, label
                continue
            want_w = np.array(case["expected"]["returned_weights"], np.float64)
            if ill[i]:
                u = g / libmtl_normalizers(norm, g, losses[i])[:, None]
                h = u @ u.T
                assert w[i] @ h @ w[i] <= want_w @ h @ want_w + 1e-5 * np.max(np.diag(h)), label
                continue
            checked += 1
            np.testing.assert_allclose(w[i], want_w, rtol=RTOL, atol=1e-12, err_msg=label)
            check_combined(coef[i], g, want, label)
    assert checked >= total // 2  # ill-conditioned cases are the exception


def test_mgda_large_gradients_take_the_best_pair(x64) -> None:
    """LibMTL's pair search starts from a cost bound of 1e8 and fails above it; ours takes the best pair.

    The iterations themselves are not scale-free (their step lengths are compared with absolute
    thresholds), so both scales are checked against the exact min-norm point, to the solver's
    stopping tolerance.
    """
    g = np.array([[3.0, 1.0, 0.0], [-1.0, 2.0, 1.0], [0.5, -2.0, 2.0]])
    gram = g @ g.T
    w = np.asarray(MGDA(jnp.asarray(np.stack([gram, 1e10 * gram]))))
    exact = np.asarray(mgda_weights(jnp.asarray(gram), convention="exact"))
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-12)
    assert np.all(np.abs(w - exact).sum(1) <= 1e-5)
    np.testing.assert_allclose(np.einsum("ni,ij,nj->n", w, gram, w), exact @ gram @ exact, rtol=1e-9)


def _libmtl_objective(gram: np.ndarray, w: np.ndarray) -> float:
    """LibMTL's SLSQP objective, with its guards, on the raw Gramian."""
    b = np.full(len(gram), 1 / len(gram))
    c = 0.5 * np.sqrt(gram.mean() + 1e-8) + 1e-8
    return float(w @ gram @ b + c * np.sqrt(w @ gram @ w + 1e-8))


def test_cagrad_matches_libmtl_to_slsqps_accuracy(x64) -> None:
    for group in groups("CAGrad"):
        gs = arrays(group, "inputs", "grads")
        dual = np.stack([np.array(c["expected"]["returned_weights"], np.float64) for c in group])
        gram = grams(gs)
        from_dual = np.asarray(CAGRAD_FROM_DUAL(gram, jnp.asarray(dual)))
        ours = np.asarray(CAGRAD(gram))
        for i, case in enumerate(group):
            label, g = case["id"], gs[i]
            check_combined(from_dual[i], g, np.array(case["expected"]["combined_grad"]), label)  # (a)
            gg = g @ g.T
            # Our dual weights, from our coefficients (1/K + lam w) (1 + c^2), w on the simplex.
            w = ours[i] * 1.25 - 1 / len(g)
            w = w / w.sum()
            f_ours, f_ref = _libmtl_objective(gg, w), _libmtl_objective(gg, dual[i])
            assert f_ours <= f_ref + OUR_GAP * max(np.max(np.diag(gg)), 1.0), label  # (b)


def test_cagrad_single_component_and_rescale(x64) -> None:
    g = jnp.asarray([[3.0, -4.0]])
    # One component: w = 1, g_w = g0 = g, d = (1 + lam) g / 1.25 with lam = c' / (||g|| + 1e-8).
    lam = (0.5 * np.sqrt(25 + 1e-8) + 1e-8) / (5 + 1e-8)
    np.testing.assert_allclose(cagrad_weights(g @ g.T, 0.5), [(1 + lam) / 1.25], rtol=1e-14)
    np.testing.assert_allclose(cagrad_weights(g @ g.T, 0.5, rescale="none"), [1 + lam], rtol=1e-14)


def _rounding(coef: np.ndarray, gs: np.ndarray) -> float:
    """Rounding of a combination of cancelling gradients (our Gramians and sums differ in order)."""
    return 1e-12 * float(np.max(np.einsum("nk,nk->n", np.abs(coef), np.linalg.norm(gs, axis=2))))


@pytest.mark.parametrize("name", ["mgda_loss+", "cagrad"])
def test_transform_applies_the_weight_rule(name: str, x64) -> None:
    """The default transforms give the pure rules' coefficients times the raw gradients."""
    group = max(groups("MGDA-loss+"), key=len)
    shape = np.shape(group[0]["inputs"]["grads"])
    group = [c for c in group if np.shape(c["inputs"]["grads"]) == shape]
    gs = np.stack(arrays(group, "inputs", "grads"))
    losses = np.stack(arrays(group, "inputs", "losses"))
    if name == "cagrad":
        tx = cagrad(0.5)
        coef = np.asarray(CAGRAD(grams(list(gs))))
    else:
        tx = mgda(normalization="loss+")
        coef = mgda_rule("loss+", list(gs), losses)[1]
    got = jax.jit(jax.vmap(lambda g, lo: tx.update({"p": g}, tx.init(None), losses=lo)[0]["p"]))(
        jnp.asarray(gs), jnp.asarray(losses)
    )
    want = np.einsum("nk,nkp->np", coef, gs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=_rounding(coef, gs))


def test_pcgrad_transform_with_fixed_order_matches_the_rule(x64) -> None:
    group = max(groups("PCGrad"), key=len)
    shape = np.shape(group[0]["inputs"]["grads"])
    gs = np.stack([g for g in arrays(group, "inputs", "grads") if g.shape == shape])
    k = gs.shape[1]
    tx = pcgrad(random_order=False)
    got = jax.jit(jax.vmap(lambda g: tx.update({"p": g}, tx.init(None))[0]["p"]))(jnp.asarray(gs))
    coef = np.asarray(PCGRAD(grams(list(gs)), jnp.tile(jnp.arange(k), (len(gs), k, 1))))
    want = np.einsum("nk,nkp->np", coef, gs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=_rounding(coef, gs))


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`convention`"):
        pcgrad(convention="LibMTL")
    with pytest.raises(ValueError, match="`convention`"):
        mgda(convention="sener")
    with pytest.raises(ValueError, match="`convention`"):
        cagrad(convention="exact")  # "exact" is MGDA's own solver, not a CAGrad convention
    with pytest.raises(ValueError, match="`combine`"):
        mgda(combine="both")
    with pytest.raises(ValueError, match="`convention`"):
        mgda_weights(jnp.eye(2), convention="x")
    with pytest.raises(ValueError, match="`convention`"):
        pcgrad_weights(jnp.eye(2), jnp.zeros((2, 2), int), convention="x")
    with pytest.raises(ValueError, match="`rescale`"):
        cagrad_coefficients(jnp.eye(2), jnp.full(2, 0.5), rescale="1/(1+c)")
    with pytest.raises(TypeError, match="`max_iters`"):
        mgda(max_iters=2.5)
