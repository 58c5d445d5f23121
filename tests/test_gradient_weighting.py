"""Gradient-statistics balancers and scale-invariant SoftAdapt (learning-rate annealing, grad norm, NTK)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softadapt_jax as sj
from softadapt_jax import training
from softadapt_jax.balancers.gradient_weighting import (
    grad_norm_balancer,
    lr_annealing_balancer,
    ntk_balancer,
)
from softadapt_jax.gradients import per_component_grads
from softadapt_jax.statistics import compute_statistic

X = jnp.linspace(-1.0, 1.0, 16)[:, None]
SCALES = jnp.array([1.0, 30.0, 0.05])


def init_params() -> dict:
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    return {"w1": jax.random.normal(k1, (1, 8)), "b1": jnp.zeros(8), "w2": jax.random.normal(k2, (8, 3)) / 3}


def residuals(params: dict, batch: jax.Array) -> tuple[jax.Array, ...]:
    pred = jnp.tanh(batch @ params["w1"] + params["b1"]) @ params["w2"]
    targets = jnp.concatenate([jnp.sin(3 * batch), batch**2, jnp.cos(batch)], axis=1)
    r = (pred - targets) * jnp.sqrt(SCALES)
    return r[:, 0], r[:, 1], r[:, 2]


def loss_components(params: dict, batch: jax.Array) -> jax.Array:
    return jnp.stack([jnp.mean(r**2) for r in residuals(params, batch)])


def flat_grads(params: dict) -> np.ndarray:
    """[K, P] per-component gradients by K separate jax.grad calls (the independent check)."""
    rows = []
    for k in range(3):
        g = jax.grad(lambda p, k=k: loss_components(p, X)[k])(params)
        rows.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
    return np.stack(rows)


def test_statistics_match_hand_computation() -> None:
    params = init_params()
    g = flat_grads(params)
    chex.assert_trees_all_close(
        compute_statistic("grad_norm", loss_components, params, X), np.linalg.norm(g, axis=1), rtol=1e-5
    )
    grad_abs = compute_statistic("grad_abs", loss_components, params, X)
    np.testing.assert_allclose(grad_abs[:, 0], np.abs(g).max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(grad_abs[:, 1], np.abs(g).mean(axis=1), rtol=1e-5)
    traces = compute_statistic("ntk_trace", loss_components, params, X, residuals_fn=residuals)
    for k in range(3):
        per_point = [jax.grad(lambda p, i=i, k=k: residuals(p, X)[k][i])(params) for i in range(X.shape[0])]
        want = np.mean([sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(pp)) for pp in per_point])
        np.testing.assert_allclose(traces[k], want, rtol=1e-5)


def test_ntk_trace_backward_pass_of_each_term_skips_the_other_terms() -> None:
    # PINN residual terms usually have their own forward passes. The NTK statistic must take
    # one VJP per term, so that term k's VJP never runs the backward pass of term j != k
    # (counted at trace time: each term's custom_vjp backward rule is traced once per VJP).
    traced = [0, 0, 0]

    def tapped(j: int):
        @jax.custom_vjp
        def tap(p):
            return p

        def bwd(_, g):
            traced[j] += 1
            return (g,)

        tap.defvjp(lambda p: (p, None), bwd)
        return tap

    taps = [tapped(j) for j in range(3)]

    def separate_residuals(params: dict, batch: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(residuals(taps[j](params), batch)[j] for j in range(3))

    params = init_params()
    traces = compute_statistic("ntk_trace", loss_components, params, X, residuals_fn=separate_residuals)
    assert traced == [1, 1, 1]
    expected = compute_statistic("ntk_trace", loss_components, params, X, residuals_fn=residuals)
    np.testing.assert_allclose(traces, expected, rtol=1e-5)


def test_looped_per_component_grads_equal_jacrev() -> None:
    # The statistics use the looped VJPs (vmap_vjps=False); check that path against jacrev.
    params = init_params()
    losses, grads = per_component_grads(loss_components, vmap_vjps=False)(params, X)
    jac = jax.jacrev(loss_components)(params, X)
    chex.assert_trees_all_close(grads, jac, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(losses, loss_components(params, X))


def run_balancer(balancer, stats_seq, losses_seq):
    state = balancer.init()
    out = []
    for stats, losses in zip(stats_seq, losses_seq, strict=True):
        w, state = balancer.update(losses, state, stats)
        out.append(np.asarray(w))
    return out, state


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_lr_annealing_hand_computation(mode: str) -> None:
    rng = np.random.default_rng(0)
    stats = [np.abs(rng.normal(size=(3, 2))) + 0.1 for _ in range(4)]
    losses = [np.ones(3)] * 4
    bal = lr_annealing_balancer(num_losses=3, alpha=0.9, mode=mode, update_every=2)
    got, _ = run_balancer(bal, [jnp.asarray(s, jnp.float32) for s in stats], losses)
    lam = np.ones(3)
    for step, s in enumerate(stats, start=1):
        if step % 2 == 0:
            num = s[0, 0] if mode == "max" else s[0, 1]
            hat = num / s[:, 1]
            hat[0] = 1.0
            lam = 0.1 * lam + 0.9 * hat
        np.testing.assert_allclose(got[step - 1], lam, rtol=1e-6)


@pytest.mark.parametrize("factory", [grad_norm_balancer, ntk_balancer])
def test_norm_and_ntk_weighting_hand_computation(factory) -> None:
    rng = np.random.default_rng(1)
    stats = [np.abs(rng.normal(size=3)) + 0.1 for _ in range(6)]
    bal = factory(num_losses=3, momentum=0.9, update_every=3)
    got, _ = run_balancer(bal, [jnp.asarray(s, jnp.float32) for s in stats], [np.ones(3)] * 6)
    w = np.ones(3)
    for step, s in enumerate(stats, start=1):
        if step % 3 == 0:
            w = 0.9 * w + 0.1 * (s.sum() / s)
        np.testing.assert_allclose(got[step - 1], w, rtol=1e-6)


def test_zero_statistic_keeps_previous_average() -> None:
    bal = grad_norm_balancer(num_losses=2, update_every=1)
    w, _ = bal.update(jnp.ones(2), bal.init(), jnp.array([0.0, 1.0]))
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w, [1.0, 0.9 + 0.1 * 1.0])


def test_missing_statistic_and_bad_config_errors() -> None:
    bal = grad_norm_balancer(num_losses=2)
    with pytest.raises(ValueError, match="needs the gradient statistic 'grad_norm'"):
        bal.update(jnp.ones(2), bal.init())
    with pytest.raises(ValueError, match="`mode` must be one of"):
        lr_annealing_balancer(num_losses=2, mode="median")
    with pytest.raises(ValueError, match=r"`reference` must be an index in \[0, 2\)"):
        lr_annealing_balancer(num_losses=2, reference=2)
    with pytest.raises(ValueError, match=r"`momentum` must be a finite number in \[0, 1\]"):
        ntk_balancer(num_losses=2, momentum=1.5)
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number in \[0, 1\]"):
        lr_annealing_balancer(num_losses=2, alpha=-0.1)
    with pytest.raises(ValueError, match="needs `residuals_fn"):
        compute_statistic("ntk_trace", loss_components, init_params(), X)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        compute_statistic("hessian", loss_components, init_params(), X)


def counting_loss(counter: list[int]):
    """loss_components whose every backward pass through the network bumps ``counter``."""

    @jax.custom_vjp
    def tap(x):
        return x

    def fwd(x):
        return x, None

    def bwd(_, g):
        jax.debug.callback(lambda: counter.append(1), ordered=True)
        return (g,)

    tap.defvjp(fwd, bwd)

    def fn(params, batch):
        return loss_components(jax.tree.map(tap, params), batch)

    return fn


def backward_passes_per_step(step, state, counter: list[int], steps: int) -> list[int]:
    """Runs ``steps`` steps from ``state``; the taps each one added to ``counter``."""
    calls = []
    for _ in range(steps):
        before = len(counter)
        state, _ = step(state, X)
        jax.effects_barrier()
        calls.append(len(counter) - before)
    return calls


@pytest.mark.parametrize(
    "factory", [lr_annealing_balancer, grad_norm_balancer, functools.partial(ntk_balancer)]
)
def test_per_component_gradients_only_on_recompute_steps(factory) -> None:
    counter: list[int] = []
    fn = counting_loss(counter)
    bal = factory(num_losses=3, update_every=5)
    tx = optax.chain(sj.balance(bal), optax.adam(1e-2))
    state = training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)
    step = jax.jit(training.make_train_step(fn, residuals_fn=residuals))
    calls = backward_passes_per_step(step, state, counter, 10)
    leaves = len(jax.tree.leaves(init_params()))
    # One backward pass (one tap per parameter leaf) except on steps 5 and 10. There, the
    # gradient statistics take K = 3 backward passes, which also give the step's gradient
    # (no fourth); NTK keeps its one pass and adds per-point passes through residuals_fn.
    plain = [c for i, c in enumerate(calls, start=1) if i % 5]
    assert plain == [leaves] * 8
    recompute = 3 * leaves if bal.statistic != "ntk_trace" else leaves
    assert calls[4] == calls[9] == recompute


@pytest.mark.parametrize("factory", [lr_annealing_balancer, grad_norm_balancer])
@pytest.mark.parametrize("has_aux", [False, True])
def test_recompute_step_equals_weighted_gradient_plus_statistic(factory, has_aux: bool) -> None:
    # On a recompute step the gradient is sum_k w_k g_k from the per-component gradients; it must
    # be the step the plain path takes (weighted VJP) with the statistic computed on the side.
    bal = factory(num_losses=3, update_every=2)
    tx = optax.chain(sj.balance(bal), optax.adam(1e-2))
    fn = (lambda p, b: (loss_components(p, b), {"mean_x": jnp.mean(b)})) if has_aux else loss_components
    state = training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)
    step = jax.jit(training.make_train_step(fn, has_aux=has_aux))
    state, _ = step(state, X)  # step 1 holds, step 2 recomputes
    assert bool(sj.find_balancer_states(state.opt_state)[0].recompute_next)

    weights = sj.get_weights(state.opt_state)
    (total, losses), grads = sj.value_and_weighted_grad(loss_components)(weights, state.params, X)
    stats = compute_statistic(bal.statistic, loss_components, state.params, X)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, losses=losses, statistics=stats)
    expected = optax.apply_updates(state.params, updates)

    new, metrics = step(state, X)
    chex.assert_trees_all_close(new.params, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        sj.find_balancer_states(new.opt_state), sj.find_balancer_states(opt_state), rtol=1e-5
    )
    np.testing.assert_allclose(metrics["total"], total, rtol=1e-6)
    np.testing.assert_allclose(metrics["losses"], losses, rtol=1e-6)
    np.testing.assert_allclose(metrics["weights"], weights)
    if has_aux:
        np.testing.assert_allclose(metrics["aux"]["mean_x"], jnp.mean(X))


@pytest.mark.parametrize("factory", [lr_annealing_balancer, grad_norm_balancer, ntk_balancer])
def test_gradient_weighting_trains_and_matches_under_pmap(factory) -> None:
    n_dev = 4
    bal = factory(num_losses=3, update_every=2)
    tx = optax.chain(sj.balance(bal), optax.adam(1e-2))
    state = training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)
    step = jax.jit(training.make_train_step(loss_components, residuals_fn=residuals))
    single = state
    for _ in range(4):
        single, m = step(single, X)
    chex.assert_tree_all_finite(single.params)
    assert not np.allclose(m["weights"], 1.0) or bal.statistic is None
    pstep = training.make_pmap_train_step(loss_components, residuals_fn=residuals)
    multi = training.replicate(state)
    xs = training.shard_batch(X, n_dev)
    for _ in range(4):
        multi, _ = pstep(multi, xs)
    multi = training.unreplicate(multi)
    if bal.statistic == "ntk_trace":
        # Per-device NTK traces are means over equal shards, so their pmean is the global mean.
        np.testing.assert_allclose(multi.weights, single.weights, rtol=1e-4)
    else:
        np.testing.assert_allclose(multi.weights, single.weights, rtol=1e-4)
    chex.assert_trees_all_close(multi.params, single.params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["original", "normalized", "loss_weighted"])
@pytest.mark.parametrize("stencil", ["forward", "backward"])
@pytest.mark.parametrize("order", [1, 2, 5])
def test_log_scale_slopes_invariant_to_loss_units(variant: str, stencil: str, order: int) -> None:
    rng = np.random.default_rng(2)
    hist = np.exp(rng.normal(size=(6, 3))) * np.array([1e-6, 1.0, 1e3])
    factor = np.array([1e4, 1.0, 1e-2])
    kw = {"variant": variant, "accuracy_order": order, "scale": "log", "stencil": stencil, "eps": 0.0}
    a = np.asarray(sj.softadapt_weights(hist, 1.0, **kw), np.float64)
    b = np.asarray(sj.softadapt_weights(hist * factor, 1.0, **kw), np.float64)
    if variant == "loss_weighted":
        # Slopes are unit-free, the mean-loss factor is not: weights scale with the factor.
        expected = a * factor / np.sum(a * factor)
        np.testing.assert_allclose(b, expected, rtol=1e-4)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-4)


def test_raw_slopes_depend_on_loss_units() -> None:
    rng = np.random.default_rng(2)
    hist = np.exp(rng.normal(size=(6, 3))) * np.array([1e-6, 1.0, 1e3])
    raw_a = sj.softadapt_weights(hist, 1e-3, variant="original")
    raw_b = sj.softadapt_weights(hist * np.array([1e4, 1.0, 1e-2]), 1e-3, variant="original")
    assert not np.allclose(raw_a, raw_b, rtol=1e-3)


def test_relative_scale_invariant_with_initial_reference() -> None:
    rng = np.random.default_rng(3)
    losses = np.exp(rng.normal(size=(12, 3))) * np.array([1e-5, 1.0, 1e2])
    factor = np.array([1e3, 1.0, 1e-1])
    out = []
    for seq in (losses, losses * factor):
        bal = sj.softadapt_balancer(1.0, num_losses=3, variant="original", window=4, scale="relative")
        state = bal.init()
        for row in seq:
            w, state = bal.update(jnp.asarray(row, jnp.float32), state)
        out.append(np.asarray(w))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-4)
    for relative_to in ("window_mean",):
        res = []
        for seq in (losses, losses * factor):
            bal = sj.softadapt_balancer(
                1.0, num_losses=3, variant="normalized", window=4, scale="relative", relative_to=relative_to
            )
            state = bal.init()
            for row in seq:
                w, state = bal.update(jnp.asarray(row, jnp.float32), state)
            res.append(np.asarray(w))
        np.testing.assert_allclose(res[0], res[1], rtol=1e-4)


def test_scale_options_on_tiny_losses_are_not_inert() -> None:
    # Losses of ~1e-6 falling by 10% a step: raw slopes ~1e-7 make exp(beta s) ~ 1 (uniform),
    # log slopes see the relative rates.
    t = np.arange(5)[:, None]
    hist = 1e-6 * np.array([1.0, 2.0, 3.0]) * np.exp(-np.array([0.1, 0.5, 0.0]) * t)
    raw = sj.softadapt_weights(hist, 10.0, variant="original")
    log = sj.softadapt_weights(hist, 10.0, variant="original", scale="log", stencil="backward")
    np.testing.assert_allclose(raw, 1 / 3, atol=1e-4)
    assert np.argmax(log) == 2 and np.argmin(log) == 1
