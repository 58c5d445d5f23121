"""Per-component gradients, Gramian, PCGrad, MGDA, CAGrad and GradNorm.

In torchjd's style, most tests assert mathematical properties over many generated inputs rather
than stored outputs: the weight rules are pure functions of the Gramian, so a batch of random
Jacobians goes through one ``vmap``-ed call (one compilation per K) instead of a Python loop.
"""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize

from softadapt_jax.gradients import (
    GradNormState,
    cagrad,
    cagrad_weights,
    component_norms,
    gradnorm,
    gradnorm_weights,
    gramian,
    layer_grad_norms,
    mgda,
    mgda_weights,
    normalize_gramian,
    pcgrad,
    pcgrad_weights,
    per_component_grads,
    stacked_gramian,
)
from softadapt_jax.gradients.aggregators._simplex import project_simplex as _project_simplex
from softadapt_jax.gradients.aggregators.pcgrad import _random_orders

# --- a small shared-trunk model with K = 3 heads -------------------------------------------------

K = 3
RNG = np.random.default_rng(0)  # numpy, not jax.random: eager JAX ops at import cost seconds of compiling
X = jnp.asarray(RNG.normal(size=(16, 2)), jnp.float32)
Y = jnp.stack([jnp.sin(X[:, 0]), -jnp.sin(X[:, 0]) + X[:, 1], X[:, 0] * X[:, 1]], axis=1)
SHARED = {"trunk": True, "heads": False}


def init_params() -> dict:
    def normal(*shape: int) -> jax.Array:
        return jnp.asarray(RNG.normal(size=shape), jnp.float32)

    return {"trunk": {"w": normal(2, 8), "b": 0.1 * normal(8)}, "heads": {"w": normal(8, K) / 3}}


def loss_components(params: dict, x: jax.Array = X, y: jax.Array = Y) -> jax.Array:
    h = jnp.tanh(x @ params["trunk"]["w"] + params["trunk"]["b"])
    return jnp.mean((h @ params["heads"]["w"] - y) ** 2, axis=0) * jnp.array([1.0, 5.0, 0.2])


PARAMS = init_params()
N = 32  # every batch of generated Gramians has this size, so each jitted rule compiles once per K

# Jitted, batched weight rules shared by the tests (compiling dominates the run time on CPU).
# MGDA: the exact min-norm solver, whose optimality the property tests check; MGDA_LIBMTL: the
# default (LibMTL's iterations, approximate by design; its parity is in test_parity_libmtl_gradients).
MGDA = jax.jit(jax.vmap(functools.partial(mgda_weights, convention="exact")))
MGDA_LIBMTL = jax.jit(jax.vmap(mgda_weights))


@functools.partial(jax.jit, static_argnames="rescale")
def CAGRAD(g: jax.Array, c: float, rescale: str = "1+c^2") -> jax.Array:
    return jax.vmap(lambda gg: cagrad_weights(gg, c, rescale=rescale))(g)


PCGRAD = jax.jit(jax.vmap(pcgrad_weights, in_axes=(0, None)))


def random_jacobians(seed: int, n: int, k: int, p: int) -> np.ndarray:
    """n Jacobians [k, p] with rows of very different scales and frequent conflicts."""
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(n, k, p)) * rng.lognormal(sigma=0.7, size=(n, k, 1))
    return j.astype(np.float32)


def grams(j: np.ndarray) -> jax.Array:
    return jnp.einsum("nkp,nlp->nkl", j, j)


def brute_min_norm(g: np.ndarray) -> tuple[np.ndarray, float]:
    """min w^T G w over the simplex: SLSQP in float64, plus a dense grid for K <= 3."""
    k = g.shape[0]
    res = minimize(
        lambda w: w @ g @ w,
        np.full(k, 1 / k),
        jac=lambda w: 2 * g @ w,
        bounds=[(0, 1)] * k,
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    best_w, best_f = res.x, float(res.x @ g @ res.x)
    if k <= 3:
        t = np.linspace(0, 1, 401)
        pts = (
            np.stack([t, 1 - t], 1)
            if k == 2
            else np.array([(a, b, 1 - a - b) for a in t[::4] for b in t[::4] if a + b <= 1])
        )
        vals = np.einsum("ni,ij,nj->n", pts, g, pts)
        if vals.min() < best_f:
            best_w, best_f = pts[vals.argmin()], float(vals.min())
    return best_w, best_f


# --- per-component gradients and the Gramian -------------------------------------------------------


@pytest.mark.parametrize("vmap_vjps", [True, False])
def test_per_component_grads_equal_jacrev(vmap_vjps: bool) -> None:
    losses, grads = per_component_grads(loss_components, vmap_vjps=vmap_vjps)(PARAMS)
    np.testing.assert_allclose(losses, loss_components(PARAMS), rtol=1e-6)
    chex.assert_trees_all_close(grads, jax.jacrev(loss_components)(PARAMS), rtol=1e-5, atol=1e-6)


def test_per_component_grads_argnums_and_aux() -> None:
    def f(x, params):
        losses = loss_components(params, x)
        return losses, {"total": jnp.sum(losses)}

    (losses, aux), grads = per_component_grads(f, argnums=1, has_aux=True)(X, PARAMS)
    np.testing.assert_allclose(aux["total"], jnp.sum(losses), rtol=1e-6)
    chex.assert_trees_all_close(grads, jax.jacrev(loss_components)(PARAMS), rtol=1e-5, atol=1e-6)


def test_per_component_grads_mask_sums_task_specific_leaves() -> None:
    full = per_component_grads(loss_components)(PARAMS)[1]
    _, masked = per_component_grads(loss_components, mask=SHARED)(PARAMS)
    chex.assert_trees_all_close(masked["trunk"], full["trunk"])
    chex.assert_shape(masked["heads"]["w"], (1, 8, K))
    np.testing.assert_allclose(masked["heads"]["w"][0], full["heads"]["w"].sum(0), rtol=1e-6)


@pytest.mark.parametrize("method", ["stacked", "sequential"])
@pytest.mark.parametrize("mask", [None, SHARED, lambda p: {"trunk": {"w": True, "b": False}, "heads": False}])
def test_gramian_equals_explicit_inner_products(method: str, mask) -> None:
    grads = jax.jacrev(loss_components)(PARAMS)
    if mask is None:
        keep = jax.tree.map(lambda _: True, PARAMS)
    elif callable(mask):
        keep = mask(PARAMS)
        keep = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), keep, PARAMS)
    else:
        keep = {"trunk": {"w": True, "b": True}, "heads": {"w": False}}
    flat = jnp.concatenate(
        [g.reshape(K, -1) for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(keep), strict=True) if m],
        axis=1,
    )
    losses, g = jax.jit(gramian(loss_components, mask=mask, method=method))(PARAMS)
    np.testing.assert_allclose(losses, loss_components(PARAMS), rtol=1e-6)
    np.testing.assert_allclose(g, flat @ flat.T, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(g, g.T)
    np.testing.assert_allclose(
        stacked_gramian(grads, mask=mask, params=PARAMS), flat @ flat.T, rtol=2e-5, atol=1e-5
    )


def test_gramian_has_aux() -> None:
    f = lambda p: (loss_components(p), 7.0)  # noqa: E731
    for method in ("stacked", "sequential"):
        (losses, aux), g = gramian(f, has_aux=True, method=method)(PARAMS)
        assert aux == 7.0 and g.shape == (K, K) and losses.shape == (K,)


# --- properties of the weight rules over generated Gramians -------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_mgda_weights_on_simplex_and_nonnegative_inner_products(k: int) -> None:
    j = random_jacobians(k, N, k, k + 6)  # p > k: a unique, non-zero min-norm point
    g = grams(j)
    w = MGDA(g)
    assert np.all(np.asarray(w) >= 0)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    d = jnp.einsum("nk,nkp->np", w, j)
    inner = jnp.einsum("np,nkp->nk", d, j)
    scale = jnp.linalg.norm(j, axis=2) * jnp.linalg.norm(d, axis=1, keepdims=True)
    # <d, g_k> >= ||d||^2 >= 0 at the exact optimum; allow float32 rounding.
    assert np.all(np.asarray(inner) >= -1e-4 * np.asarray(scale))
    assert np.all(
        np.asarray(inner) >= np.sum(np.asarray(d) ** 2, 1, keepdims=True) - 1e-3 * np.asarray(scale)
    )


@pytest.mark.parametrize("k", [2, 3])
def test_mgda_weights_minimise_the_norm(k: int) -> None:
    j = random_jacobians(10 + k, N, k, 5)
    g = np.asarray(grams(j), np.float64)
    w = np.asarray(MGDA(jnp.asarray(g, jnp.float32)), np.float64)
    for gi, wi in zip(g, w, strict=True):
        bw, bf = brute_min_norm(gi)
        scale = np.max(np.diag(gi))
        assert wi @ gi @ wi <= bf + 1e-5 * scale
        if np.linalg.eigvalsh(gi)[0] > 1e-3 * scale:  # unique minimiser: the weights match too
            np.testing.assert_allclose(wi, bw, atol=2e-3)


def test_mgda_conflicting_pair_gives_zero_update() -> None:
    g = jnp.array([[1.0, -1.0], [-1.0, 1.0]]) * 4.0
    np.testing.assert_allclose(MGDA(jnp.tile(g, (N, 1, 1)))[0], [0.5, 0.5])


# The example Jacobian of torchjd's MGDA docstring, whose normalisations follow Sener & Koltun's
# gradient_normalizers; the expected updates are computed by hand below.
J2 = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
J2_LOSSES = jnp.array([0.5, 2.0])


def _two_point_update(n: np.ndarray, combine: str) -> np.ndarray:
    """The MGDA update for J2 with normalisers n, by the closed form of the 2-point min-norm problem."""
    u, v = np.asarray(J2[0]) / n[0], np.asarray(J2[1]) / n[1]
    t = np.clip((v @ v - u @ v) / ((u - v) @ (u - v)), 0.0, 1.0)
    if combine == "normalized":  # LibMTL: the weights multiply the normalised gradients
        return t * u + (1 - t) * v
    return t * np.asarray(J2[0]) + (1 - t) * np.asarray(J2[1])  # Sener & Koltun: the raw ones


@pytest.mark.parametrize("combine", ["normalized", "raw"])
@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_normalization_by_hand(normalization: str, combine: str) -> None:
    norms = np.linalg.norm(np.asarray(J2), axis=1)
    losses = np.asarray(J2_LOSSES)
    n = {"none": np.ones(2), "l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    tx = mgda(normalization=normalization, combine=combine)
    upd, _ = jax.jit(tx.update)({"p": J2}, tx.init(None), losses=J2_LOSSES)
    np.testing.assert_allclose(upd["p"], _two_point_update(n, combine), rtol=1e-5, atol=1e-5)
    if combine == "raw":  # the published values of torchjd's docstring for the same Jacobian and losses
        published = {"none": [0, 1, 1], "l2": [1, 1, 1], "loss": [3.49, 1, 1], "loss+": [4.1606, 1, 1]}
        np.testing.assert_allclose(upd["p"], published[normalization], atol=5e-4)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_mgda_l2_normalization_ignores_gradient_scales(k: int) -> None:
    # With "l2" the weights depend on the directions only: rescaling each component leaves them.
    j = RNG.normal(size=(N, k, 6))
    scales = np.exp(RNG.uniform(-4, 4, size=(N, k, 1)))
    gram = jnp.asarray(j @ np.swapaxes(j, 1, 2), jnp.float32)
    scaled = jnp.asarray((scales * j) @ np.swapaxes(scales * j, 1, 2), jnp.float32)
    norm = jax.vmap(lambda g: normalize_gramian(g, "l2"))
    np.testing.assert_allclose(MGDA(norm(scaled)), MGDA(norm(gram)), atol=2e-4)
    # "loss" divides by the losses: scaling a loss and its gradient together cancels out.
    losses = jnp.asarray(RNG.uniform(0.5, 2.0, size=(N, k)), jnp.float32)
    by_loss = jax.vmap(lambda g, lo: normalize_gramian(g, "loss", lo))
    np.testing.assert_allclose(
        MGDA(by_loss(scaled, losses * scales[..., 0])), MGDA(by_loss(gram, losses)), atol=2e-4
    )


def test_pcgrad_two_components_nonnegative_inner_products() -> None:
    j = random_jacobians(3, N, 2, 6)
    for orders in ([[0, 1], [1, 0]], [[1, 0], [0, 1]]):  # the property holds for every order
        c = PCGRAD(grams(j), jnp.asarray(orders))
        d = jnp.einsum("nk,nkp->np", c, j)
        inner = np.asarray(jnp.einsum("np,nkp->nk", d, j))
        scale = np.asarray(jnp.linalg.norm(j, axis=2) * jnp.linalg.norm(d, axis=1, keepdims=True))
        assert np.all(inner >= -1e-5 * scale)
    # Conflicting pairs really were projected: the sum would have had a negative inner product.
    plain = np.asarray(jnp.einsum("nkp,nlp->nl", j, j))
    assert np.any(plain < 0)


def test_pcgrad_matches_sequential_projection_reference() -> None:
    j = random_jacobians(4, N, 3, 5)
    orders = np.stack([np.random.default_rng(i).permutation(3) for i in range(3)])
    c = PCGRAD(grams(j), jnp.asarray(orders))
    for jn, cn in zip(j.astype(np.float64), np.asarray(c), strict=True):
        total = np.zeros(jn.shape[1])
        for i in range(3):
            gi = jn[i].copy()
            for t in orders[i]:
                dot = gi @ jn[t]
                if dot < 0:
                    gi -= dot / (jn[t] @ jn[t]) * jn[t]
            total += gi
        np.testing.assert_allclose(cn @ jn, total, rtol=1e-4, atol=1e-4)


PERMS = [np.array([0, 2, 1]), np.array([2, 0, 1])]  # a transposition and a cycle


@pytest.mark.parametrize("perm", PERMS, ids=str)
def test_permutation_equivariance(perm: np.ndarray) -> None:
    j = random_jacobians(5, N, 3, 6)
    g, gp = grams(j), grams(j[:, perm])
    # CAGrad's dual solver stops at ~1e-4 accuracy; rounding sends permuted inputs down other paths.
    for rule, tol in ((MGDA, 2e-4), (lambda x: CAGRAD(x, 0.5), 2e-3)):
        w, wp = rule(g), rule(gp)
        np.testing.assert_allclose(wp, np.asarray(w)[:, perm], rtol=tol, atol=tol)
    # PCGrad with fixed orders: relabel the orders with the permutation.
    orders = np.stack([np.random.default_rng(i).permutation(3) for i in range(3)])
    inv = np.argsort(perm)
    orders_p = inv[orders[perm]]
    w, wp = PCGRAD(g, jnp.asarray(orders)), PCGRAD(gp, jnp.asarray(orders_p))
    np.testing.assert_allclose(wp, np.asarray(w)[:, perm], rtol=1e-4, atol=1e-5)


def test_pcgrad_equivariant_in_expectation() -> None:
    """Averaged over every combination of visiting orders (the expectation over PCGrad's random draws)."""
    j = random_jacobians(6, 1, 3, 4)[0]
    perm = np.array([2, 0, 1])
    rows = list(itertools.permutations(range(3)))
    orders = jnp.asarray([[a, b, c] for a in rows for b in rows for c in rows])  # [216, 3, 3]
    expected = jax.jit(jax.vmap(pcgrad_weights, in_axes=(None, 0)))
    mean_w = expected(grams(j[None])[0], orders).mean(0)
    mean_wp = expected(grams(j[perm][None])[0], orders).mean(0)
    np.testing.assert_allclose(mean_wp, np.asarray(mean_w)[perm], rtol=1e-4, atol=1e-5)


def cagrad_reference(g: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """The authors' dual objective solved with scipy (their solver), in float64."""
    k = g.shape[0]
    b = np.full(k, 1 / k)
    sqrt_phi = c * np.sqrt(g.mean() + 1e-8)
    obj = lambda w: w @ g @ b + sqrt_phi * np.sqrt(w @ g @ w + 1e-8)  # noqa: E731
    res = minimize(
        obj,
        b.copy(),
        bounds=[(0, 1)] * k,
        constraints={"type": "eq", "fun": lambda w: 1 - w.sum()},
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    return res.x, obj


def test_cagrad_matches_scipy_dual_and_update() -> None:
    k, c = 3, 0.5
    j = random_jacobians(23, N, k, 8)
    g = np.asarray(grams(j), np.float64)
    coef = np.asarray(CAGRAD(jnp.asarray(g, jnp.float32), c)) * (1 + c**2)  # undo the default rescale
    for gi, ji, ci in zip(g, j.astype(np.float64), coef, strict=True):
        scale = np.max(np.diag(gi))
        gs = gi / scale  # the scale the solver works at
        w_ref, obj = cagrad_reference(gs, c)
        # Recover our dual weights from the coefficients: coef = 1/K + lam * w, w on the simplex.
        w = ci - 1 / k
        w = w / w.sum()
        assert obj(w) <= obj(w_ref) + 1e-4
        g0 = ji.mean(0)
        gw = w_ref @ ji
        d_ref = g0 + c * np.linalg.norm(g0) / np.linalg.norm(gw) * gw
        np.testing.assert_allclose(ci @ ji, d_ref, rtol=2e-2, atol=2e-2 * np.linalg.norm(d_ref))


def test_cagrad_zero_radius_is_the_mean_and_rescales() -> None:
    g = grams(random_jacobians(7, N, 3, 5))
    np.testing.assert_allclose(CAGRAD(g, 0.0), np.full((N, 3), 1 / 3), rtol=1e-6)
    # One component: g0 = g_w = g, so d = (1 + c) g before rescaling.
    g1 = grams(random_jacobians(7, N, 1, 5))
    for rescale, factor in (("none", 1.0), ("1+c^2", 1.49), ("1+c", 1.7)):
        np.testing.assert_allclose(CAGRAD(g1, 0.7, rescale=rescale), np.full((N, 1), 1.7 / factor), rtol=1e-5)


def test_project_simplex() -> None:
    v = jnp.array([0.3, -1.0, 2.0, 0.5])
    p = _project_simplex(v)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    assert np.all(np.asarray(p) >= 0)
    grid = np.random.default_rng(0).dirichlet(np.ones(4), 2000)
    assert (
        np.linalg.norm(np.asarray(p) - np.asarray(v))
        <= np.min(np.linalg.norm(grid - np.asarray(v), axis=1)) + 1e-6
    )


# --- the optax transforms (jit, vmap, pmap with axis_name and training in a chain: test_contract.py) ---

COMBINERS = {
    "pcgrad": lambda **kw: pcgrad(seed=0, **kw),
    "mgda": lambda **kw: mgda(**kw),
    "cagrad": lambda **kw: cagrad(0.5, **kw),
}
# One masked transform per method and its jitted update, shared by the tests below (same shapes,
# so each compiles once).
MASKED = {name: make(mask=SHARED) for name, make in COMBINERS.items()}
UPDATE = {name: jax.jit(tx.update) for name, tx in MASKED.items()}


@pytest.fixture(scope="module")
def grads() -> dict:
    return jax.jit(per_component_grads(loss_components))(PARAMS)[1]


def shared_weights(name: str, g: jax.Array, state) -> jax.Array:
    """The weight rule a combiner applies, evaluated directly on a [K, K] Gramian."""
    if name == "pcgrad":
        return pcgrad_weights(g, _random_orders(jax.random.split(state.key)[1], K))
    batch = g[None].repeat(N, 0)
    return MGDA_LIBMTL(batch)[0] if name == "mgda" else CAGRAD(batch, 0.5)[0]


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_combiner_mask_and_weights(name: str, grads: dict) -> None:
    state = MASKED[name].init(PARAMS)
    upd, _ = UPDATE[name](grads, state, PARAMS)
    # Task-specific leaves get the plain sum; shared ones the combination from the shared Gramian.
    np.testing.assert_allclose(upd["heads"]["w"], grads["heads"]["w"].sum(0), rtol=1e-6)
    w = shared_weights(name, stacked_gramian(grads, mask=SHARED), state)
    chex.assert_trees_all_close(
        upd["trunk"], jax.tree.map(lambda g: jnp.tensordot(w, g, 1), grads["trunk"]), rtol=1e-4, atol=1e-6
    )


def test_masked_per_component_grads_feed_a_masked_combiner(grads: dict) -> None:
    # per_component_grads(mask=...) returns task-specific leaves summed, as [1, ...]: same update.
    _, masked = jax.jit(per_component_grads(loss_components, mask=SHARED))(PARAMS)
    state = MASKED["mgda"].init(PARAMS)
    chex.assert_trees_all_close(
        UPDATE["mgda"](masked, state, PARAMS)[0],
        UPDATE["mgda"](grads, state, PARAMS)[0],
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_single_component_reduces_to_its_gradient(name: str) -> None:
    g = {"a": jnp.array([[1.0, -2.0, 0.5]]), "b": jnp.array([[[3.0], [4.0]]])}
    kw = {"rescale": "1+c"} if name == "cagrad" else {}
    tx = COMBINERS[name](**kw)
    upd, _ = tx.update(g, tx.init(None))
    chex.assert_trees_all_close(upd, jax.tree.map(lambda x: x[0], g), rtol=1e-6)
    if name == "cagrad":  # the authors' default scaling: (1 + c) / (1 + c^2) g
        tx = cagrad(0.5)
        upd, _ = tx.update(g, tx.init(None))
        chex.assert_trees_all_close(upd, jax.tree.map(lambda x: x[0] * 1.5 / 1.25, g), rtol=1e-6)


def test_gradnorm_single_component_reduces_to_its_gradient() -> None:
    tx = gradnorm(num_losses=1, layer="a")
    g = {"a": jnp.array([[1.0, -2.0]]), "b": jnp.array([[3.0]])}
    upd, state = jax.jit(tx.update)(g, tx.init(None), losses=jnp.array([2.0]))
    chex.assert_trees_all_close(upd, jax.tree.map(lambda x: x[0], g))
    np.testing.assert_allclose(state.weights, [1.0])


def test_mgda_update_has_nonnegative_inner_products_through_transform(grads: dict) -> None:
    upd, _ = UPDATE["mgda"](grads, MASKED["mgda"].init(PARAMS), PARAMS)
    d = jnp.concatenate([u.ravel() for u in jax.tree.leaves(upd["trunk"])])
    for k in range(K):
        gk = jnp.concatenate([g[k].ravel() for g in jax.tree.leaves(grads["trunk"])])
        assert float(d @ gk) >= -1e-6 * float(jnp.linalg.norm(d) * jnp.linalg.norm(gk))


def test_pcgrad_key_advances_and_random_order_off_is_deterministic(grads: dict) -> None:
    s0 = MASKED["pcgrad"].init(PARAMS)
    np.testing.assert_array_equal(s0.key, jax.random.PRNGKey(0))
    _, s1 = UPDATE["pcgrad"](grads, s0, PARAMS)
    assert not np.array_equal(s0.key, s1.key)
    fixed = pcgrad(random_order=False)
    update = jax.jit(fixed.update)
    u1, f1 = update(grads, fixed.init(PARAMS))
    u2, _ = update(grads, f1)
    chex.assert_trees_all_close(u1, u2)


# --- GradNorm ------------------------------------------------------------------------------------------


def test_gradnorm_weights_sum_to_k_and_favour_the_slow_component(grads: dict) -> None:
    tx = gradnorm(num_losses=3, layer="trunk", alpha=1.5, weight_optimizer=optax.sgd(0.05))
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    # Component 0 does not improve, 1 and 2 halve: component 0 trains slowest.
    for t in range(20):
        losses = jnp.array([1.0, 0.5**t, 0.5**t])
        _, state = update(grads, state, PARAMS, losses=losses)
        np.testing.assert_allclose(state.weights.sum(), 3.0, rtol=1e-5)
        assert np.all(np.asarray(state.weights) > 0)
    np.testing.assert_allclose(state.initial_losses, [1.0, 1.0, 1.0])
    assert int(state.count) == 20
    assert float(state.weights[0]) > 1.0


def test_gradnorm_update_uses_weights_before_the_step(grads: dict) -> None:
    tx = gradnorm(num_losses=3, layer=lambda t: t["trunk"]["w"])
    state = tx.init(PARAMS)._replace(weights=jnp.array([0.5, 1.0, 1.5]))
    upd, new = jax.jit(tx.update)(grads, state, losses=jnp.ones(3))
    chex.assert_trees_all_close(
        upd, jax.tree.map(lambda g: jnp.tensordot(jnp.array([0.5, 1.0, 1.5]), g, 1), grads), rtol=1e-6
    )
    assert not np.allclose(new.weights, state.weights)


def test_gradnorm_path_b_matches_path_a(grads: dict) -> None:
    from softadapt_jax import value_and_weighted_grad

    a = gradnorm(num_losses=3, layer="trunk/w")
    b = gradnorm(num_losses=3, layer="trunk/w", per_component=False)
    sa, sb = a.init(PARAMS), b.init(PARAMS)
    losses = loss_components(PARAMS)

    @jax.jit
    def both(sa, sb):
        ua, sa = a.update(grads, sa, PARAMS, losses=losses)
        _, norms = layer_grad_norms(loss_components, "trunk/w")(PARAMS)
        (_, _), wgrads = value_and_weighted_grad(loss_components)(gradnorm_weights(sb), PARAMS)
        ub, sb = b.update(wgrads, sb, PARAMS, losses=losses, layer_norms=norms)
        return ua, sa, ub, sb, norms

    for _ in range(3):
        ua, sa, ub, sb, norms = both(sa, sb)
        chex.assert_trees_all_close(ua, ub, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sa.weights, sb.weights, rtol=1e-5)
    np.testing.assert_allclose(component_norms(grads, ("trunk", "w")), norms, rtol=1e-6)


def test_gradnorm_weights_reader() -> None:
    tx = optax.chain(gradnorm(num_losses=2, layer="a"), optax.sgd(0.1))
    state = tx.init({"a": jnp.ones(2)})
    np.testing.assert_allclose(gradnorm_weights(state), [1.0, 1.0])
    assert isinstance(state[0], GradNormState)
    with pytest.raises(ValueError, match="exactly one GradNormState"):
        gradnorm_weights(optax.sgd(0.1).init({"a": jnp.ones(2)}))


# --- every promised ValueError -------------------------------------------------------------------------


def test_value_errors_per_component_and_gramian() -> None:
    with pytest.raises(ValueError, match="argnums"):
        per_component_grads(loss_components, argnums=-1)
    with pytest.raises(ValueError, match="only 1 positional"):
        per_component_grads(loss_components, argnums=1)(PARAMS)
    with pytest.raises(ValueError, match=r"shape \[K\]"):
        per_component_grads(lambda p: jnp.sum(p["heads"]["w"]))(PARAMS)
    with pytest.raises(ValueError, match="vmap_vjps"):
        per_component_grads(loss_components, vmap_vjps=1)
    with pytest.raises(ValueError, match="method"):
        gramian(loss_components, method="dense")
    with pytest.raises(ValueError, match="bools"):
        per_component_grads(loss_components, mask={"trunk": 1, "heads": 0})(PARAMS)
    with pytest.raises(ValueError, match="structure"):
        per_component_grads(loss_components, mask={"trunk": True})(PARAMS)
    with pytest.raises(ValueError, match="selects no"):
        gramian(loss_components, mask={"trunk": False, "heads": False}, method="sequential")(PARAMS)
    with pytest.raises(ValueError, match="selects no"):
        stacked_gramian({"a": jnp.ones((2, 3))}, mask={"a": False})


def test_value_errors_combiners() -> None:
    for bad in (1.5, "0", True):
        with pytest.raises(ValueError, match="seed"):
            pcgrad(seed=bad)
    with pytest.raises(ValueError, match="random_order"):
        pcgrad(random_order=1)
    with pytest.raises(ValueError, match="max_iters"):
        mgda(max_iters=0)
    with pytest.raises(ValueError, match="tol"):
        mgda(tol=-1.0)
    with pytest.raises(ValueError, match="normalization"):
        mgda(normalization="L2")
    with pytest.raises(ValueError, match="needs `losses`"):
        normalize_gramian(jnp.eye(2), "loss+")
    by_loss = mgda(normalization="loss")
    with pytest.raises(ValueError, match=r"needs the current component losses.*shape \(2,\)"):
        by_loss.update({"a": jnp.ones((2, 3))}, by_loss.init(None))
    with pytest.raises(ValueError, match=r"`losses` must have shape \(2,\).*got \(3,\)"):
        by_loss.update({"a": jnp.ones((2, 3))}, by_loss.init(None), losses=jnp.ones(3))
    with pytest.raises(ValueError, match="`c`"):
        cagrad(-0.1)
    with pytest.raises(ValueError, match="`c`"):
        cagrad(float("nan"))
    with pytest.raises(ValueError, match="rescale"):
        cagrad(rescale="1/(1+c)")
    with pytest.raises(ValueError, match="rescale"):
        cagrad_weights(jnp.eye(2), rescale="x")
    tx = mgda()
    with pytest.raises(ValueError, match="disagree on the number of components"):
        tx.update({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}, tx.init(None))
    with pytest.raises(ValueError, match="does not match its parameter"):
        tx.update({"a": jnp.ones((2, 3))}, tx.init(None), {"a": jnp.ones(4)})
    with pytest.raises(ValueError, match="scalar leaf"):
        tx.update({"a": jnp.ones(())}, tx.init(None))
    with pytest.raises(ValueError, match="selects no leaf"):
        mgda(mask={"a": False}).update({"a": jnp.ones((2, 3))}, optax.EmptyState())


def test_value_errors_gradnorm(grads: dict) -> None:
    with pytest.raises(ValueError, match="num_losses"):
        gradnorm(num_losses=0, layer="a")
    with pytest.raises(TypeError, match="num_losses"):
        gradnorm(num_losses=2.0, layer="a")
    with pytest.raises(ValueError, match="layer"):
        gradnorm(num_losses=2, layer="")
    with pytest.raises(ValueError, match="layer"):
        gradnorm(num_losses=2, layer=3)
    with pytest.raises(ValueError, match="alpha"):
        gradnorm(num_losses=2, layer="a", alpha=-1.0)
    with pytest.raises(ValueError, match="min_weight"):
        gradnorm(num_losses=2, layer="a", min_weight=1.0)
    with pytest.raises(ValueError, match="per_component"):
        gradnorm(num_losses=2, layer="a", per_component="yes")
    tx = gradnorm(num_losses=3, layer="trunk/v")
    with pytest.raises(ValueError, match="needs the current component losses"):
        tx.update(grads, tx.init(PARAMS))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        tx.update(grads, tx.init(PARAMS), losses=jnp.ones(2))
    with pytest.raises(ValueError, match="no key 'v' under trunk"):
        tx.update(grads, tx.init(PARAMS), losses=jnp.ones(3))
    with pytest.raises(ValueError, match="leading axis of size 3"):
        gradnorm(num_losses=2, layer="trunk").update(
            grads, gradnorm(num_losses=2, layer="a").init(None), losses=jnp.ones(2)
        )
    b = gradnorm(num_losses=3, layer="trunk", per_component=False)
    with pytest.raises(ValueError, match="layer_norms"):
        b.update(PARAMS, b.init(PARAMS), losses=jnp.ones(3))
    with pytest.raises(ValueError, match="selects no gradient leaf"):
        component_norms(grads, lambda t: {})
