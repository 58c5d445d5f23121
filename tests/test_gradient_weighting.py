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
    inverse_grad_norm_balancer,
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


def flat_grads_by_leaf(params: dict, fn=None) -> list[dict[str, np.ndarray]]:
    """Per component k: {leaf name: flat dL_k/dleaf}, by separate jax.grad calls."""
    fn = loss_components if fn is None else fn
    k_num = int(fn(params, X).shape[0])
    return [
        {name: np.ravel(v) for name, v in jax.grad(lambda p, k=k: fn(p, X)[k])(params).items()}
        for k in range(k_num)
    ]


def per_point_sq_norms(fn, params: dict) -> np.ndarray:
    """Squared gradient norms of every entry of fn(params), from its full Jacobian (jacrev)."""

    @jax.jit
    def norms(p: dict) -> jax.Array:
        jac = jax.jacrev(lambda q: jnp.ravel(fn(q)))(p)
        return sum(jnp.sum(j.reshape(j.shape[0], -1) ** 2, axis=1) for j in jax.tree.leaves(jac))

    return np.asarray(norms(params))


def statistic(kind: str, fn, params, batch, **options) -> jax.Array:
    """compute_statistic under jit (eager, its per-point vmaps dispatch op by op)."""
    return jax.jit(lambda p, b: compute_statistic(kind, fn, p, b, **options))(params, batch)


def test_statistics_match_hand_computation() -> None:
    params = init_params()
    g = flat_grads(params)
    chex.assert_trees_all_close(
        compute_statistic("grad_norm", loss_components, params, X), np.linalg.norm(g, axis=1), rtol=1e-5
    )
    grad_abs = compute_statistic("grad_abs", loss_components, params, X)
    np.testing.assert_allclose(grad_abs[:, 0], np.abs(g).max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(grad_abs[:, 1], np.abs(g).mean(axis=1), rtol=1e-5)
    losses = np.asarray(loss_components(params, X))
    np.testing.assert_allclose(
        compute_statistic("sqrt_loss_grad_norm", loss_components, params, X),
        np.linalg.norm(g, axis=1) / (2 * np.sqrt(losses)),
        rtol=1e-5,
    )
    traces = statistic("ntk_trace", loss_components, params, X, residuals_fn=residuals)
    want = [per_point_sq_norms(lambda p, k=k: residuals(p, X)[k], params).mean() for k in range(3)]
    np.testing.assert_allclose(traces, want, rtol=1e-5)


def test_kernels_filter_and_per_layer_mean() -> None:
    # The learning-rate-annealing authors' statistic: weight matrices only (w1, w2; not b1), max
    # over all their entries, and the plain average of the per-layer means.
    params = init_params()
    by_leaf = flat_grads_by_leaf(params)
    got = compute_statistic(
        "grad_abs", loss_components, params, X, params_filter="kernels", mean_over="leaves"
    )
    for k, leaves in enumerate(by_leaf):
        kernels = [np.abs(leaves["w1"]), np.abs(leaves["w2"])]
        np.testing.assert_allclose(got[k, 0], max(x.max() for x in kernels), rtol=1e-5)
        np.testing.assert_allclose(got[k, 1], np.mean([x.mean() for x in kernels]), rtol=1e-5)
    per_leaf = sj.statistics.per_leaf_grad_abs(
        per_component_grads(loss_components)(params, X)[1], params_filter="kernels"
    )
    assert per_leaf.shape == (3, 2, 2)
    for k, leaves in enumerate(by_leaf):
        for layer, name in enumerate(["w1", "w2"]):
            np.testing.assert_allclose(per_leaf[k, layer, 0], np.abs(leaves[name]).max(), rtol=1e-5)
            np.testing.assert_allclose(per_leaf[k, layer, 1], np.abs(leaves[name]).mean(), rtol=1e-5)
    # A callable filter (optax-style mask) selecting the same leaves gives the same statistic.
    mask = functools.partial(jax.tree.map, lambda s: s.ndim >= 2)
    same = compute_statistic("grad_abs", loss_components, params, X, params_filter=mask, mean_over="leaves")
    np.testing.assert_allclose(same, got, rtol=1e-6)


GROUPS = (0, 1, 1)


def grouped_loss(params: dict, batch: jax.Array) -> jax.Array:
    losses = loss_components(params, batch)
    return jnp.stack([losses[0], losses[1] + losses[2]])


@pytest.mark.parametrize("kind", ["grad_abs", "grad_norm", "sqrt_loss_grad_norm"])
def test_grouped_statistic_is_that_of_the_summed_loss(kind: str) -> None:
    params = init_params()
    got = compute_statistic(kind, loss_components, params, X, groups=GROUPS)
    want = compute_statistic(kind, grouped_loss, params, X)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_grouped_ntk_is_the_mean_over_the_concatenated_points() -> None:
    params = init_params()

    def uneven(p: dict, batch: dict) -> tuple[jax.Array, ...]:
        # Term 1 on 16 points, term 2 on the first 4: the group mean weighs the points, not the terms.
        r = residuals(p, batch["a"])
        return r[0], r[1], residuals(p, batch["b"])[2]

    batch = {"a": X, "b": X[:4]}
    per_term = statistic("ntk_trace", loss_components, params, batch, residuals_fn=uneven)
    got = statistic("ntk_trace", loss_components, params, batch, residuals_fn=uneven, groups=GROUPS)
    np.testing.assert_allclose(got[0], per_term[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], (16 * per_term[1] + 4 * per_term[2]) / 20, rtol=1e-6)


def test_ntk_terms_off_the_batch_and_of_unequal_sizes() -> None:
    # Term 0 reads its own 16 rows, term 1 the 5 rows of another leaf, term 2 fixed points that are
    # not in the batch at all (jaxpi's initial condition): every point of every term enters.
    params = init_params()
    fixed = jnp.linspace(0.0, 0.5, 7)[:, None]

    def mixed(p: dict, batch: dict) -> tuple[jax.Array, ...]:
        return residuals(p, batch["a"])[0], residuals(p, batch["b"])[1], residuals(p, fixed)[2]

    batch = {"a": X, "b": X[3:8]}
    got = statistic("ntk_trace", loss_components, params, batch, residuals_fn=mixed)
    want = [per_point_sq_norms(lambda p, k=k: mixed(p, batch)[k], params).mean() for k in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    capped = statistic("ntk_trace", loss_components, params, batch, residuals_fn=mixed, max_points=4)
    want = [per_point_sq_norms(lambda p, k=k: mixed(p, batch)[k], params)[:4].mean() for k in range(3)]
    np.testing.assert_allclose(capped, want, rtol=1e-5)


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
    traces = statistic("ntk_trace", loss_components, params, X, residuals_fn=separate_residuals)
    assert traced == [1, 1, 1]
    expected = statistic("ntk_trace", loss_components, params, X, residuals_fn=residuals)
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


def recomputes(steps: int, every: int, first: bool) -> list[bool]:
    """Which accepted steps (0-based) apply the rule."""
    return [i % every == (0 if first else every - 1) for i in range(steps)]


@pytest.mark.parametrize(
    "convention, mode",
    [("wang2021", None), ("wang2021", "mean"), ("physicsnemo", None), ("physicsnemo", "max")],
)
def test_lr_annealing_hand_computation(convention: str, mode: str | None) -> None:
    rng = np.random.default_rng(0)
    stats = [np.abs(rng.normal(size=(3, 2))) + 0.1 for _ in range(7)]
    bal = lr_annealing_balancer(num_losses=3, convention=convention, mode=mode, update_every=3)
    got, _ = run_balancer(bal, [jnp.asarray(s, jnp.float32) for s in stats], [np.ones(3)] * 7)
    wang = convention == "wang2021"
    col = {"max": 0, "mean": 1}[mode or ("max" if wang else "mean")]
    alpha, eps = (0.1, 0.0) if wang else (0.01, 1e-8)
    lam = np.ones(3)
    for i, (s, due) in enumerate(zip(stats, recomputes(7, 3, True), strict=True)):
        if due:
            if wang:  # λ inside the boundary gradient; the reference keeps 1
                hat = s[0, col] / (lam * s[:, 1])
                hat[0] = 1.0
            else:
                hat = s[0, col] / (s[:, 1] + eps)
            lam = (1 - alpha) * lam + alpha * hat
        np.testing.assert_allclose(got[i], lam, rtol=1e-6)


@pytest.mark.parametrize("factory", [inverse_grad_norm_balancer, ntk_balancer])
def test_norm_and_ntk_weighting_hand_computation(factory) -> None:
    rng = np.random.default_rng(1)
    stats = [np.abs(rng.normal(size=3)) + 0.1 for _ in range(7)]
    bal = factory(num_losses=3, momentum=0.9, update_every=3)
    got, _ = run_balancer(bal, [jnp.asarray(s, jnp.float32) for s in stats], [np.ones(3)] * 7)
    w = np.ones(3)
    for i, (s, due) in enumerate(zip(stats, recomputes(7, 3, True), strict=True)):
        if due:  # jaxpi: mean over the terms, momentum on the old value, also at step 0
            w = 0.9 * w + 0.1 * (s.mean() / s)
        np.testing.assert_allclose(got[i], w, rtol=1e-6)


def test_physicsnemo_ntk_hand_computation() -> None:
    rng = np.random.default_rng(4)
    stats = [np.abs(rng.normal(size=3)) + 0.1 for _ in range(9)]
    bal = ntk_balancer(num_losses=3, convention="physicsnemo", update_every=4)
    assert bal.statistic == "sqrt_loss_grad_norm"
    got, _ = run_balancer(bal, [jnp.asarray(s, jnp.float32) for s in stats], [np.ones(3)] * 9)
    w = np.ones(3)  # 1 until the first evaluation (PhysicsNeMo: 0 on steps 1 .. n-1)
    for i, (s, due) in enumerate(zip(stats, recomputes(9, 4, False), strict=True)):
        if due:  # no smoothing, normalised by the sum
            w = s.sum() / s
        np.testing.assert_allclose(got[i], w, rtol=1e-6)


def test_groups_share_one_weight() -> None:
    # Helmholtz's layout: a residual and four edges sharing one λ from their summed loss.
    bal = lr_annealing_balancer(num_losses=5, groups=(0, 1, 1, 1, 1), update_every=1)
    stats = jnp.array([[4.0, 1.0], [2.0, 0.5]])
    w, state = bal.update(jnp.ones(5), bal.init(), stats)
    lam = 0.9 + 0.1 * 4.0 / (1.0 * 0.5)
    np.testing.assert_allclose(w, [1.0, lam, lam, lam, lam], rtol=1e-6)
    assert bal.groups == (0, 1, 1, 1, 1)
    w, _ = bal.update(jnp.ones(5), state, stats)
    np.testing.assert_allclose(w[1:], 0.9 * lam + 0.1 * 4.0 / (lam * 0.5), rtol=1e-6)


def test_zero_statistic_keeps_previous_average() -> None:
    bal = inverse_grad_norm_balancer(num_losses=2, update_every=1)
    w, _ = bal.update(jnp.ones(2), bal.init(), jnp.array([0.0, 1.0]))
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w, [1.0, 0.9 + 0.1 * 0.5])


def test_missing_statistic_and_bad_config_errors() -> None:
    bal = inverse_grad_norm_balancer(num_losses=2)
    with pytest.raises(ValueError, match="needs the gradient statistic 'grad_norm'"):
        bal.update(jnp.ones(2), bal.init())
    with pytest.raises(ValueError, match="`mode` must be one of"):
        lr_annealing_balancer(num_losses=2, mode="median")
    with pytest.raises(ValueError, match="`convention` must be one of"):
        lr_annealing_balancer(num_losses=2, convention="modulus")
    with pytest.raises(ValueError, match="`convention` must be one of"):
        ntk_balancer(num_losses=2, convention="wang2021")
    with pytest.raises(ValueError, match=r"`reference` must be a loss index in \[0, 2\)"):
        lr_annealing_balancer(num_losses=2, reference=2)
    with pytest.raises(ValueError, match=r"`reference` must be a group index in \[0, 2\)"):
        lr_annealing_balancer(num_losses=3, groups=(0, 1, 1), reference=2)
    with pytest.raises(ValueError, match=r"`momentum` must be a finite number in \[0, 1\]"):
        ntk_balancer(num_losses=2, momentum=1.5)
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number in \[0, 1\]"):
        lr_annealing_balancer(num_losses=2, alpha=-0.1)
    with pytest.raises(ValueError, match="`statistic_at` must be one of"):
        inverse_grad_norm_balancer(num_losses=2, statistic_at="before")
    with pytest.raises(TypeError, match="`update_first` must be a bool"):
        inverse_grad_norm_balancer(num_losses=2, update_first=1)
    with pytest.raises(ValueError, match="`max_points` applies to convention='jaxpi' only"):
        ntk_balancer(num_losses=2, convention="physicsnemo", max_points=8)
    with pytest.raises(ValueError, match="`params_filter` must be one of"):
        lr_annealing_balancer(num_losses=2, params_filter="weights")
    with pytest.raises(TypeError, match="`params_filter` must be one of"):
        inverse_grad_norm_balancer(num_losses=2, params_filter={"w1": True})
    with pytest.raises(ValueError, match="needs `residuals_fn"):
        compute_statistic("ntk_trace", loss_components, init_params(), X)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        compute_statistic("hessian", loss_components, init_params(), X)
    with pytest.raises(ValueError, match="`mean_over` must be one of"):
        compute_statistic("grad_abs", loss_components, init_params(), X, mean_over="layers")
    with pytest.raises(ValueError, match=r"`params_filter='kernels'` selects none of the 1 parameter leaves"):
        sj.statistics.statistic_from_grads("grad_abs", {"bias": jnp.ones((2, 3))}, params_filter="kernels")
    with pytest.raises(ValueError, match="must return a pytree of bools with the structure"):
        compute_statistic("grad_norm", loss_components, init_params(), X, params_filter=lambda p: [True])
    with pytest.raises(ValueError, match="'sqrt_loss_grad_norm' statistic needs `losses`"):
        sj.statistics.statistic_from_grads("sqrt_loss_grad_norm", {"w": jnp.ones((2, 3))})


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


FACTORIES = [lr_annealing_balancer, inverse_grad_norm_balancer, ntk_balancer]


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("statistic_at", ["updated", "current"])
def test_per_component_gradients_only_on_recompute_steps(factory, statistic_at: str) -> None:
    counter: list[int] = []
    fn = counting_loss(counter)
    bal = factory(num_losses=3, update_every=5, statistic_at=statistic_at)
    tx = optax.chain(sj.balance(bal), optax.adam(1e-2))
    state = training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)
    step = jax.jit(training.make_train_step(fn, balancer=bal, residuals_fn=residuals))
    calls = backward_passes_per_step(step, state, counter, 10)
    leaves = len(jax.tree.leaves(init_params()))
    # One backward pass (one tap per parameter leaf) except on steps 0 and 5 (0-based). There,
    # the step's weighted pass plus K = 3 more (at the updated or the current parameters, under
    # the cond). NTK keeps its one pass and adds per-point passes through residuals_fn (not tapped).
    plain = [c for i, c in enumerate(calls) if i % 5]
    assert plain == [leaves] * 8
    recompute = leaves if bal.statistic == "ntk_trace" else 4 * leaves
    assert calls[0] == calls[5] == recompute
    if statistic_at == "current" and bal.statistic != "ntk_trace":
        # Recomputing every step, "current" takes only the K passes: they also give the step's
        # gradient (the whole step under the cond).
        every = factory(num_losses=3, update_every=1, statistic_at=statistic_at)
        tx = optax.chain(sj.balance(every), optax.adam(1e-2))
        state = training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)
        step = jax.jit(training.make_train_step(fn, balancer=every, residuals_fn=residuals))
        assert backward_passes_per_step(step, state, counter, 3) == [3 * leaves] * 3


def reference_step(state, stats_fn):
    """The step by hand: weighted gradient, optimizer update, then the statistic from stats_fn."""
    weights = sj.get_weights(state.opt_state)
    (total, losses), grads = sj.value_and_weighted_grad(loss_components)(weights, state.params, X)
    zeros = jnp.zeros_like(stats_fn(state.params))
    updates, _ = state.tx.update(grads, state.opt_state, state.params, losses=losses, statistics=zeros)
    stats = stats_fn(state.params, optax.apply_updates(state.params, updates))
    updates, opt_state = state.tx.update(
        grads, state.opt_state, state.params, losses=losses, statistics=stats
    )
    return optax.apply_updates(state.params, updates), opt_state, total, losses, weights


# Every statistic at both evaluation points; has_aux (orthogonal to the statistic) on one of each.
@pytest.mark.parametrize(
    "factory, statistic_at, has_aux",
    [(f, at, False) for f in FACTORIES for at in ("updated", "current")]
    + [(lr_annealing_balancer, "updated", True), (ntk_balancer, "current", True)],
)
def test_recompute_step_by_hand(factory, statistic_at: str, has_aux: bool) -> None:
    # A recompute step: the step's gradient of sum_k w_k L_k with the weights held before it, the
    # optimizer update, and the statistic at the updated parameters (or at the step's own).
    bal = factory(num_losses=3, update_every=2, update_first=False, statistic_at=statistic_at)
    tx = optax.chain(sj.balance(bal), optax.adam(1e-2))
    fn = (lambda p, b: (loss_components(p, b), {"mean_x": jnp.mean(b)})) if has_aux else loss_components
    state = training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)
    step = jax.jit(training.make_train_step(fn, balancer=bal, has_aux=has_aux, residuals_fn=residuals))
    state, _ = step(state, X)  # step 0 holds, step 1 recomputes
    assert bool(sj.find_balancer_states(state.opt_state)[0].recompute_next)

    opts = dict(bal.statistic_options)

    def stats_fn(current, updated=None):
        at = current if updated is None or statistic_at == "current" else updated
        return compute_statistic(bal.statistic, loss_components, at, X, residuals_fn=residuals, **opts)

    params, opt_state, total, losses, weights = reference_step(state, stats_fn)
    new, metrics = step(state, X)
    chex.assert_trees_all_close(new.params, params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        sj.find_balancer_states(new.opt_state), sj.find_balancer_states(opt_state), rtol=1e-5
    )
    assert not np.allclose(new.weights, weights)
    np.testing.assert_allclose(metrics["total"], total, rtol=1e-6)
    np.testing.assert_allclose(metrics["losses"], losses, rtol=1e-6)
    np.testing.assert_allclose(metrics["weights"], weights)
    if has_aux:
        np.testing.assert_allclose(metrics["aux"]["mean_x"], jnp.mean(X))


@pytest.mark.parametrize("factory", FACTORIES)
def test_grouped_train_step_uses_the_group_statistic(factory) -> None:
    # The groups travel in the Balancer the step is given.
    bal = factory(num_losses=3, groups=GROUPS, update_every=1, statistic_at="current")
    tx = optax.chain(sj.balance(bal), optax.adam(1e-2))
    state = training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)
    new, _ = jax.jit(training.make_train_step(loss_components, balancer=bal, residuals_fn=residuals))(
        state, X
    )
    opts = dict(bal.statistic_options)
    stats = compute_statistic(
        bal.statistic, loss_components, state.params, X, residuals_fn=residuals, groups=GROUPS, **opts
    )
    want, _ = bal.update(loss_components(state.params, X), bal.init(), stats)
    np.testing.assert_allclose(new.weights, want, rtol=1e-5)
    assert new.weights[1] == new.weights[2]


# Each path of the step under pmap once: a gradient statistic after the update, the residual
# (NTK) statistic after the update, and the shared per-component pass at the current parameters.
@pytest.mark.parametrize(
    "factory, statistic_at",
    [(inverse_grad_norm_balancer, "updated"), (ntk_balancer, "updated"), (lr_annealing_balancer, "current")],
)
def test_gradient_weighting_trains_and_matches_under_pmap(factory, statistic_at: str) -> None:
    n_dev = 4
    bal = factory(num_losses=3, update_every=2, statistic_at=statistic_at)
    tx = optax.chain(sj.balance(bal), optax.adam(1e-2))
    state = training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)
    step = jax.jit(training.make_train_step(loss_components, balancer=bal, residuals_fn=residuals))
    single = state
    for _ in range(4):
        single, m = step(single, X)
    chex.assert_tree_all_finite(single.params)
    assert not np.allclose(m["weights"], 1.0)
    pstep = training.make_pmap_train_step(loss_components, balancer=bal, residuals_fn=residuals)
    multi = training.replicate(state)
    xs = training.shard_batch(X, n_dev)
    for _ in range(4):
        multi, _ = pstep(multi, xs)
    multi = training.unreplicate(multi)
    # Per-device NTK traces are means over equal shards, so their pmean is the global mean.
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


def test_grad_norm_balancer_is_a_deprecated_alias() -> None:
    with pytest.warns(DeprecationWarning, match="use inverse_grad_norm_balancer"):
        old = sj.grad_norm_balancer(num_losses=2, update_every=3)
    new = sj.inverse_grad_norm_balancer(num_losses=2, update_every=3)
    assert (old.name, old.statistic, old.schedule, old.statistic_options) == (
        new.name,
        new.statistic,
        new.schedule,
        new.statistic_options,
    )


def test_get_weights_reads_every_weighting_state() -> None:
    params = {"w": jnp.ones(3)}
    balancer_tx = optax.chain(sj.balance(sj.softadapt_balancer(num_losses=2)), optax.sgd(0.1))
    gradnorm_tx = sj.gradnorm(num_losses=2, layer="w")
    for tx in (balancer_tx, gradnorm_tx):
        w = sj.get_weights(tx.init(params))
        assert w.shape == (2,)
    both = (balancer_tx.init(params), gradnorm_tx.init(params))
    with pytest.raises(ValueError, match=r"exactly one weighting state.*found 2"):
        sj.get_weights(both)
    with pytest.raises(ValueError, match=r"found 0 \(none\)"):
        sj.get_weights(optax.sgd(0.1).init(params))
