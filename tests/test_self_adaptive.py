"""Self-adaptive point-wise weights (SA-PINN, McClenny & Braga-Neto 2023, arXiv:2009.04544).

There is no recorded reference run: the paper's update equations are checked by hand on a
3-point problem (``w <- w - eta dL/dw``, ``lambda <- lambda + rho dL/dlambda``, both gradients at
the same point), then the masks, the ascent's effect, jit/vmap, the non-finite guard, and a short
1-D Poisson training run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softadapt_jax.self_adaptive import (
    SA_MASKS,
    SelfAdaptiveState,
    sa_ascent,
    sa_init,
    sa_loss,
    sa_mask,
    sa_optimizer,
)

X = np.array([1.0, 2.0, 3.0])
Y = np.array([1.0, 1.0, 4.0])


def _toy_loss(params, mask="polynomial"):
    """u(x) = a x on 3 points, residuals a x_i - y_i, every point self-adaptive."""
    r = params["net"]["a"] * jnp.asarray(X) - jnp.asarray(Y)
    return sa_loss({"res": r}, params["sa"], mask=mask)[0]


def _toy_params(a=0.5, lam=(1.0, 2.0, 0.5)):
    return {"net": {"a": jnp.asarray(a)}, "sa": SelfAdaptiveState({"res": jnp.asarray(lam)})}


def test_paper_update_by_hand_three_points() -> None:
    """Two SGD steps of the simultaneous min-max update with m(lambda) = lambda^2, by hand."""
    eta, rho = 0.01, 0.1
    tx = sa_optimizer(optax.sgd(eta), optax.sgd(rho))
    params = _toy_params()
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_toy_loss)(p), s, p))
    a, lam = 0.5, np.array([1.0, 2.0, 0.5])
    for _ in range(2):
        r = a * X - Y
        # L = (1/3) sum lam_i^2 r_i^2: dL/da = (2/3) sum lam_i^2 r_i x_i, dL/dlam_i = (2/3) lam_i r_i^2.
        grad_a = 2.0 / 3.0 * np.sum(lam**2 * r * X)
        grad_lam = 2.0 / 3.0 * lam * r**2
        a, lam = a - eta * grad_a, lam + rho * grad_lam
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["net"]["a"], a, rtol=1e-6)
        np.testing.assert_allclose(params["sa"].weights["res"], lam, rtol=1e-6)


@pytest.mark.parametrize("mask", SA_MASKS)
def test_masks_and_their_gradients(mask: str) -> None:
    lam = jnp.array([0.0, 0.5, 2.0])
    m = sa_mask(mask, c=3.0, q=3.0)
    expected = {
        "identity": (np.asarray(lam), np.ones(3)),
        "polynomial": (3.0 * np.asarray(lam) ** 3, 9.0 * np.asarray(lam) ** 2),
        "sigmoid": (3.0 / (1.0 + np.exp(-np.asarray(lam))), None),
    }[mask]
    np.testing.assert_allclose(m(lam), expected[0], rtol=1e-6)
    slope = jax.vmap(jax.grad(m))(lam)
    if expected[1] is not None:
        np.testing.assert_allclose(slope, expected[1], rtol=1e-6)
    assert np.all(np.asarray(slope) >= 0)  # ascent never lowers a weight
    # The loss with a named mask is mean(m(lambda) r^2).
    r = jnp.array([1.0, -2.0, 0.5])
    loss, per_term = sa_loss({"res": r}, SelfAdaptiveState({"res": lam}), mask=sa_mask(mask, c=3.0, q=3.0))
    np.testing.assert_allclose(loss, np.mean(np.asarray(m(lam)) * np.asarray(r) ** 2), rtol=1e-6)
    np.testing.assert_allclose(per_term["res"], loss, rtol=1e-6)


def test_custom_mask_and_unweighted_terms() -> None:
    state = SelfAdaptiveState({"res": jnp.array([1.0, 3.0])})
    residuals = {"res": jnp.array([2.0, 1.0]), "data": jnp.array([1.0, 1.0, 4.0])}
    total, per_term = sa_loss(residuals, state, mask=lambda lam: lam + 1.0)
    np.testing.assert_allclose(per_term["res"], (2.0 * 4.0 + 4.0 * 1.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(per_term["data"], 6.0, rtol=1e-6)  # no weights: mean r^2
    np.testing.assert_allclose(total, 12.0, rtol=1e-6)
    # A vector residual per point: the point's weight multiplies all its components.
    vec = {"res": jnp.array([[1.0, 2.0], [0.0, 1.0]])}
    np.testing.assert_allclose(sa_loss(vec, state, mask="identity")[0], (1 + 4 + 0 + 3) / 4, rtol=1e-6)
    np.testing.assert_allclose(sa_loss(residuals, None)[0], 2.5 + 6.0, rtol=1e-6)


def test_ascent_raises_the_weights_of_the_largest_residuals() -> None:
    """With SGD the weights grow in proportion to m'(lambda) r^2: the worst point gains most."""
    residual = jnp.array([0.1, 1.0, 3.0, 0.0])
    params = {"net": {"a": jnp.asarray(0.0)}, "sa": sa_init({"res": 4})}
    tx = sa_optimizer(optax.sgd(0.0), optax.sgd(0.1))

    def loss(p):
        return sa_loss({"res": residual + p["net"]["a"]}, p["sa"])[0]

    @jax.jit
    def run(params):
        def body(carry, _):
            p, s = carry
            upd, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, upd), s), None

        return jax.lax.scan(body, (params, tx.init(params)), None, length=5)[0][0]

    lam = np.asarray(run(params)["sa"].weights["res"])
    assert lam[3] == 1.0  # a zero residual leaves its weight alone
    assert lam[2] > lam[1] > lam[0] > 1.0
    # The Adam ascent (the authors' choice) also only raises weights.
    adam = sa_optimizer(optax.sgd(0.0), optax.adam(0.1))
    upd, _ = adam.update(jax.grad(loss)(params), adam.init(params), params)
    assert np.all(np.asarray(upd["sa"].weights["res"])[:3] > 0) and float(upd["sa"].weights["res"][3]) == 0.0
    ascent = sa_ascent(optax.sgd(1.0))
    np.testing.assert_allclose(ascent.update(jnp.array([2.0]), ascent.init(jnp.zeros(1)))[0], [2.0])


def test_jit_and_vmap_match_the_loop() -> None:
    res = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)))
    lam = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 5)))
    batched = jax.jit(jax.vmap(lambda r, lam: sa_loss({"res": r}, SelfAdaptiveState({"res": lam}))[0]))(
        res, lam
    )
    looped = [float(np.mean(np.asarray(lam[i]) ** 2 * np.asarray(res[i]) ** 2)) for i in range(4)]
    np.testing.assert_allclose(batched, looped, rtol=1e-6)


def test_init() -> None:
    state = sa_init({"res": 3, "bc": 2}, init={"res": 100.0, "bc": 1.0})
    np.testing.assert_array_equal(state.weights["res"], 100.0)
    np.testing.assert_array_equal(state.weights["bc"], 1.0)
    drawn = sa_init({"res": 50, "ic": 4}, key=jax.random.key(0))
    assert all(0.0 <= float(v.min()) and float(v.max()) < 1.0 for v in drawn.weights.values())
    assert drawn.weights["res"].shape == (50,)


def test_init_dtype_follows_x64(x64) -> None:
    assert sa_init({"res": 2}).weights["res"].dtype == jnp.float64


def test_nonfinite_step_is_skipped() -> None:
    tx = sa_optimizer(optax.adam(0.1), optax.adam(0.1))
    params = _toy_params()
    state = tx.init(params)
    bad = jax.tree.map(lambda g: g * jnp.nan, params)
    upd, state = jax.jit(tx.update)(bad, state, params)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(upd))
    assert int(state.notfinite_count) == 1
    raw = sa_optimizer(optax.adam(0.1), optax.adam(0.1), skip_nonfinite=False)
    upd, _ = jax.jit(raw.update)(bad, raw.init(params), params)
    assert not np.all(np.isfinite(np.asarray(upd["sa"].weights["res"])))


def test_poisson_1d_trains_without_nan() -> None:
    """-u'' = pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0: SA weights on the residual and the boundary."""
    x = jnp.linspace(0.0, 1.0, 24)
    xb = jnp.array([0.0, 1.0])
    keys = jax.random.split(jax.random.key(0), 3)
    sizes = [(1, 16), (16, 16), (16, 1)]
    net = [
        {"w": jax.random.normal(k, s) * jnp.sqrt(1.0 / s[0]), "b": jnp.zeros(s[1])}
        for k, s in zip(keys, sizes, strict=True)
    ]

    def u(p, z):
        h = jnp.reshape(z, (1,))
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return (h @ p[-1]["w"] + p[-1]["b"])[0]

    def residuals(p):
        def r(z):
            u_xx = jax.jvp(lambda y: jax.jvp(lambda s: u(p, s), (y,), (1.0,))[1], (z,), (1.0,))[1]
            return -u_xx - jnp.pi**2 * jnp.sin(jnp.pi * z)

        return {"res": jax.vmap(r)(x), "bc": jax.vmap(lambda z: u(p, z))(xb)}

    params = {"net": net, "sa": sa_init({"res": 24, "bc": 2})}
    tx = sa_optimizer(optax.adam(5e-3), optax.adam(5e-3))

    def loss(p):
        return sa_loss(residuals(p["net"]), p["sa"])[0]

    def plain(p):
        return sa_loss(residuals(p["net"]), None)[0]  # the unweighted PINN loss

    @jax.jit
    def train(params):
        def body(carry, _):
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            upd, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, upd), s), value

        (final, _), values = jax.lax.scan(body, (params, tx.init(params)), None, length=300)
        return final, values, plain(params), plain(final)

    final, values, before, after = train(params)
    assert np.all(np.isfinite(np.asarray(values))) and np.isfinite(float(after))
    assert float(after) < 0.05 * float(before)
    lam = final["sa"].weights
    assert all(np.all(np.asarray(v) >= 1.0) for v in lam.values())  # ascent only raised the weights
    assert float(jnp.max(lam["res"])) > 1.0
    u_pred = jax.vmap(lambda z: u(final["net"], z))(x)
    assert float(jnp.max(jnp.abs(u_pred - jnp.sin(jnp.pi * x)))) < 0.2


def test_errors() -> None:
    with pytest.raises(ValueError, match="`mask` must be one of"):
        sa_mask("cubic")
    with pytest.raises(ValueError, match="`q` must be a finite number > 0"):
        sa_mask("polynomial", q=0.0)
    with pytest.raises(ValueError, match="`c` must be a finite number > 0"):
        sa_mask("sigmoid", c=-1.0)
    with pytest.raises(ValueError, match="`num_points` must be a non-empty mapping"):
        sa_init({})
    with pytest.raises(ValueError, match=r"`num_points\['res'\]` must be an integer >= 1"):
        sa_init({"res": 0})
    with pytest.raises(ValueError, match="`init` must be a finite number >= 0"):
        sa_init({"res": 2}, init=-1.0)
    with pytest.raises(ValueError, match=r"`init` has no value for the terms \['bc'\]"):
        sa_init({"res": 2, "bc": 1}, init={"res": 1.0})
    state = SelfAdaptiveState({"res": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"residuals\['res'\] must be \[N, ...\] with N = 3"):
        sa_loss({"res": jnp.ones(4)}, state)
    with pytest.raises(ValueError, match=r"weights for terms \['res'\] that are not in `residuals`"):
        sa_loss({"bc": jnp.ones(4)}, state)
    with pytest.raises(ValueError, match="`residuals` must be a non-empty mapping"):
        sa_loss({}, state)
    with pytest.raises(ValueError, match="`skip_nonfinite` must be a bool"):
        sa_optimizer(optax.sgd(1.0), optax.sgd(1.0), skip_nonfinite=0)
