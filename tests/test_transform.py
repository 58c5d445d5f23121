"""The ``softadapt`` optax transform: composition, paths (a)/(b), wrappers, robustness, checkpoints.

The test problem: a tiny tanh MLP (2 -> 8 -> 1) fitted to three targets on
three disjoint thirds of a batch, with loss scales 1, 100 and 0.01, so the
SoftAdapt weights move well away from uniform.
"""

from __future__ import annotations

import functools

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softadapt_jax import (
    SOFTADAPT_STATIC_ARGS,
    BalancerState,
    find_balancer_states,
    get_weights,
    softadapt,
    softadapt_weights,
    value_and_weighted_grad,
)

K = 3
_X = jax.random.normal(jax.random.PRNGKey(0), (24, 2))
_PARTS = jnp.split(_X, K)
_TARGETS = (
    jnp.sin(_PARTS[0][:, 0]),
    jnp.cos(_PARTS[1][:, 1]),
    _PARTS[2][:, 0] * _PARTS[2][:, 1],
)
_SCALES = (1.0, 100.0, 0.01)


def init_params(seed: int = 1) -> dict:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "w1": 0.5 * jax.random.normal(k1, (2, 8)),
        "b1": jnp.zeros(8),
        "w2": 0.5 * jax.random.normal(k2, (8, 1)),
        "b2": jnp.zeros(1),
    }


def mlp(params, x):
    return (jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"])[:, 0]


def loss_components(params):
    """``[K]`` losses of very different scales."""
    residuals = jnp.split(mlp(params, _X), K)
    terms = zip(_SCALES, residuals, _TARGETS, strict=True)
    return jnp.stack([s * jnp.mean((r - y) ** 2) for s, r, y in terms])


def path_b_step(tx, params, opt_state):
    """Path (b): one backward pass of sum_k w_k L_k with the state's weights."""
    w = get_weights(opt_state)
    (_, losses), grads = value_and_weighted_grad(loss_components)(w, params)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
    return optax.apply_updates(params, updates), opt_state


def path_a_step(tx, params, opt_state):
    """Path (a): per-component gradients stacked on a leading K axis, combined by the transform."""
    losses = loss_components(params)
    per_component = jax.jacrev(loss_components)(params)  # leaves [K, *leaf.shape]
    updates, opt_state = tx.update(per_component, opt_state, params, losses=losses)
    return optax.apply_updates(params, updates), opt_state


# Jitted references for hand computations (eager JAX would compile op by op, slowly).
ref_losses = jax.jit(loss_components)
ref_weighted_grad = jax.jit(jax.grad(lambda p, w: jnp.dot(w, loss_components(p))))
ref_weights = jax.jit(softadapt_weights, static_argnames=("variant",))


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def run_steps(step_fn, tx, params, opt_state, num_steps):
    """``num_steps`` training steps in one compiled scan; also returns the weights before each step."""

    def body(carry, _):
        p, s = carry
        w = get_weights(s)
        return step_fn(tx, p, s), w

    (params, opt_state), weights = jax.lax.scan(body, (params, opt_state), None, length=num_steps)
    return params, opt_state, weights


# ----------------------------------------------------------------------------------------------
# composition with optax
# ----------------------------------------------------------------------------------------------


def test_chain_with_sgd_matches_hand_computation():
    lr, window, steps = 1e-3, 3, 6
    tx = optax.chain(softadapt(0.1, num_losses=K, window=window, variant="original"), optax.sgd(lr))
    params = init_params()
    got_params, state, got_w = run_steps(path_b_step, tx, params, tx.init(params), steps)

    # By hand: weights applied at step t come from the losses of steps t-window..t-1.
    p, history = params, []
    for t in range(steps):
        if len(history) < window:
            w = jnp.full(K, 1.0 / K)
        else:
            w = ref_weights(np.stack(history[-window:]), 0.1, variant="original")
        chex.assert_trees_all_close(got_w[t], w, rtol=1e-5)
        history.append(np.asarray(ref_losses(p)))
        grads = ref_weighted_grad(p, w)
        p = jax.tree.map(lambda a, g: a - lr * g, p, grads)
    chex.assert_trees_all_close(got_params, p, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        get_weights(state), ref_weights(np.stack(history[-window:]), 0.1, variant="original"), rtol=1e-5
    )
    assert not np.allclose(got_w[-1], 1.0 / K, atol=1e-3)  # adapted for the last steps


def test_paths_a_and_b_agree_with_adam_under_jit():
    steps = 25
    make = functools.partial(softadapt, 0.1, num_losses=K, window=4)
    tx_a = optax.chain(make(per_component=True), optax.adam(1e-2))
    tx_b = optax.chain(make(), optax.adam(1e-2))
    params = init_params()
    pa, sa, wa = run_steps(path_a_step, tx_a, params, tx_a.init(params), steps)
    pb, sb, wb = run_steps(path_b_step, tx_b, params, tx_b.init(params), steps)
    chex.assert_trees_all_close(pa, pb, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(wa, wb, rtol=1e-5)
    chex.assert_trees_all_close(get_weights(sa), get_weights(sb), rtol=1e-5)
    # The run did adapt: weights left uniform, and training moved the parameters.
    assert float(jnp.max(jnp.abs(wb[-1] - 1.0 / K))) > 0.05
    assert float(jnp.max(jnp.abs(pb["w1"] - params["w1"]))) > 1e-3


# ----------------------------------------------------------------------------------------------
# the one-backward-pass gradient
# ----------------------------------------------------------------------------------------------


def test_value_and_weighted_grad_is_grad_of_weighted_sum_in_one_backward_pass():
    params = init_params()
    w = jnp.array([0.2, 0.5, 0.3])
    traces = {"fwd": 0, "bwd": 0}

    @jax.custom_vjp
    def tracked(p):
        return loss_components(p)

    def fwd(p):
        traces["fwd"] += 1
        return jax.vjp(loss_components, p)

    def bwd(vjp_fn, ct):
        traces["bwd"] += 1
        return vjp_fn(ct)

    tracked.defvjp(fwd, bwd)
    (total, losses), grads = jax.jit(value_and_weighted_grad(tracked))(w, params)
    assert traces == {"fwd": 1, "bwd": 1}  # one forward, one backward pass for all K losses

    expected = ref_weighted_grad(params, w)
    chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(losses, ref_losses(params), rtol=1e-6)
    chex.assert_trees_all_close(total, jnp.dot(w, losses), rtol=1e-6)


def test_weights_are_constants_no_gradient_flows_into_them():
    params = init_params()
    w = jnp.array([0.2, 0.5, 0.3])
    state = softadapt(num_losses=K).init(params)
    vwg = value_and_weighted_grad(loss_components)

    @jax.jit
    def derivatives_wrt_weights(w):
        # Without stop_gradient d(total)/dw would be the losses and d(sum of grads)/dw the
        # per-loss gradient sums; get_weights would pass the cotangent through to the state.
        d_total = jax.grad(lambda w: vwg(w, params)[0][0])(w)
        d_grads = jax.grad(lambda w: sum(jnp.sum(g) for g in jax.tree.leaves(vwg(w, params)[1])))(w)
        ramp = jnp.arange(1.0, K + 1)
        d_state = jax.grad(lambda w: jnp.sum(get_weights(state._replace(weights=w)) * ramp))(w)
        return d_total, d_grads, d_state

    for d in derivatives_wrt_weights(w):
        chex.assert_trees_all_equal(d, jnp.zeros(K))


# ----------------------------------------------------------------------------------------------
# wrappers: inject_hyperparams, MultiSteps, get_weights
# ----------------------------------------------------------------------------------------------

LOSS_STREAM = np.array(
    [[1.0 + 0.3 * t, 40.0 - 3.0 * t, 2.0 * 0.8**t] for t in range(8)],
    np.float32,
)


def test_inject_hyperparams_schedules_beta():
    def schedule(count):
        return 0.5 + 0.75 * count

    factory = optax.inject_hyperparams(softadapt, static_args=SOFTADAPT_STATIC_ARGS)
    tx = factory(beta=schedule, num_losses=K, window=3, variant="original")
    fixed = factory(beta=0.5, num_losses=K, window=3, variant="original")
    update, update_fixed = jax.jit(tx.update), jax.jit(fixed.update)
    zeros = jnp.zeros(4)
    state, state_fixed = tx.init(zeros), fixed.init(zeros)
    for t, losses in enumerate(LOSS_STREAM):
        _, state = update(zeros, state, losses=losses)
        _, state_fixed = update_fixed(zeros, state_fixed, losses=losses)
        # The recorded hyperparameter is the schedule at the count before this update.
        chex.assert_trees_all_close(state.hyperparams["beta"], jnp.float32(schedule(t)))
        if t >= 2:  # window of 3 full from the third step
            hand = ref_weights(LOSS_STREAM[t - 2 : t + 1], schedule(t), variant="original")
            chex.assert_trees_all_close(get_weights(state), hand, rtol=1e-5)
    # ... and the schedule mattered: with beta fixed at 0.5 the weights differ.
    assert not np.allclose(get_weights(state), get_weights(state_fixed), atol=1e-3)


def test_inject_hyperparams_needs_static_args():
    # Without SOFTADAPT_STATIC_ARGS, inject_hyperparams turns ints/floats such as
    # `num_losses`, `window` and `eps` into arrays, which the transform refuses.
    with pytest.raises((ValueError, TypeError)):
        optax.inject_hyperparams(softadapt)(beta=0.1, num_losses=K).init(jnp.zeros(2))


def test_multisteps_balancer_sees_only_emitting_mini_steps():
    """Inside ``optax.MultiSteps(every_k_schedule=2)`` the inner chain's update runs at every
    mini-step (on the accumulated gradients), but MultiSteps keeps the new inner state only at
    the emitting mini-step (the k-th). So the balancer records the losses passed at mini-steps
    2, 4, 6, ... and its ``count`` counts optimizer steps, not mini-steps.
    """
    window = 3
    tx = optax.MultiSteps(optax.chain(softadapt(0.1, num_losses=K, window=window), optax.sgd(0.1)), 2)
    params = jnp.zeros(4)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t, losses in enumerate(LOSS_STREAM):
        _, state = update(jnp.ones(4), state, params, losses=losses)
        (bal,) = find_balancer_states(state)
        assert int(bal.count) == (t + 1) // 2
    emitted = LOSS_STREAM[1::2]  # mini-steps 2, 4, 6, 8
    np.testing.assert_array_equal(bal.history, emitted[-window:])
    np.testing.assert_array_equal(bal.initial, emitted[0])
    expected = ref_weights(emitted[-window:], 0.1, variant="loss_weighted")
    chex.assert_trees_all_close(get_weights(state), expected)


def test_multisteps_with_per_component_goes_outside():
    """MultiSteps accumulates updates shaped like the params, so path (a)'s stacked ``[K, ...]``
    updates cannot pass through it: ``softadapt(per_component=True)`` inside MultiSteps raises
    at trace time. Put it before MultiSteps instead; then it combines (and records) every
    mini-step, and MultiSteps averages the combined gradients.
    """
    params = jnp.zeros(2)
    losses = jnp.asarray(LOSS_STREAM[0])
    inside = optax.MultiSteps(optax.chain(softadapt(num_losses=K, per_component=True), optax.sgd(1.0)), 2)
    with pytest.raises(
        ValueError, match=r"per-component gradients of a parameter of shape \(2,\) have shape \(3, 2\)"
    ):
        inside.update(jnp.ones((K, 2)), inside.init(params), params, losses=losses)

    outside = optax.chain(
        softadapt(num_losses=K, window=2, per_component=True), optax.MultiSteps(optax.sgd(1.0), 2)
    )
    update = jax.jit(outside.update)
    state = outside.init(params)
    grads = jnp.arange(2.0 * K).reshape(K, 2)
    emitted = []
    for losses in LOSS_STREAM[:4]:
        w = get_weights(state)
        updates, state = update(grads, state, params, losses=losses)
        emitted.append((w, updates))
    (bal,) = find_balancer_states(state)
    assert int(bal.count) == 4  # every mini-step recorded
    (w0, _), (w1, u1) = emitted[0], emitted[1]
    chex.assert_trees_all_close(u1, -0.5 * (w0 @ grads + w1 @ grads), rtol=1e-6)


def _states_by_wrapper():
    params = {"a": jnp.zeros(3)}
    sa = functools.partial(softadapt, 0.1, num_losses=K)
    txs = {
        "chain": optax.chain(sa(), optax.adam(1e-3)),
        "named_chain": optax.named_chain(("balance", sa()), ("adam", optax.adam(1e-3))),
        "inject_hyperparams": optax.chain(
            optax.inject_hyperparams(softadapt, static_args=SOFTADAPT_STATIC_ARGS)(0.1, num_losses=K),
            optax.adam(1e-3),
        ),
        "multisteps": optax.MultiSteps(optax.chain(sa(), optax.sgd(1e-3)), 2),
        "nested": optax.MultiSteps(
            optax.named_chain(("clip", optax.clip(1.0)), ("inner", optax.chain(sa(), optax.sgd(1e-3)))), 3
        ),
    }
    return params, txs


PLANTED = jnp.array([0.1, 0.2, 0.7])


def test_get_weights_finds_state_through_wrappers():
    params, txs = _states_by_wrapper()
    for name, tx in txs.items():
        state = tx.init(params)
        chex.assert_trees_all_close(get_weights(state), jnp.full(K, 1.0 / K), custom_message=name)
        # Plant recognisable weights in the (single) balancer state and read them back.
        state = jax.tree.map(
            lambda x: x._replace(weights=PLANTED) if isinstance(x, BalancerState) else x,
            state,
            is_leaf=lambda x: isinstance(x, BalancerState),
        )
        chex.assert_trees_all_equal(get_weights(state), PLANTED, custom_message=name)
        assert len(find_balancer_states(state)) == 1, name


def test_get_weights_raises_without_or_with_two_balancers():
    params = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"exactly one weighting state.*found 0"):
        get_weights(optax.adam(1e-3).init(params))
    two = optax.chain(softadapt(num_losses=K), softadapt(num_losses=2), optax.sgd(1.0))
    with pytest.raises(ValueError, match=r"exactly one weighting state.*found 2"):
        get_weights(two.init(params))


# ----------------------------------------------------------------------------------------------
# argument errors (missing or wrong-length losses: test_contract.py, for every balancer)
# ----------------------------------------------------------------------------------------------


def test_per_component_wrong_updates_shape_raises_naming_shapes():
    tx = softadapt(num_losses=K, per_component=True)
    params = {"w": jnp.zeros((4, 2))}
    state = tx.init(params)
    losses = jnp.ones(K)
    # Leading axis of 2 instead of K=3.
    with pytest.raises(ValueError, match=r"leaf 0 has shape \(2, 4, 2\).*have shape \(3, 4, 2\)\.$"):
        tx.update({"w": jnp.ones((2, 4, 2))}, state, params, losses=losses)
    # Right leading axis, wrong trailing shape.
    with pytest.raises(ValueError, match=r"leaf 0 has shape \(3, 2, 4\).*have shape \(3, 4, 2\)"):
        tx.update({"w": jnp.ones((3, 2, 4))}, state, params, losses=losses)
    # Plain (unstacked) gradients: named as such.
    with pytest.raises(
        ValueError, match=r"looks like a plain gradient: build the transform with per_component=False"
    ):
        tx.update({"w": jnp.ones((4, 2))}, state, params, losses=losses)
    # Without params the layout cannot be told apart.
    with pytest.raises(ValueError, match=r"per_component=True needs `params`"):
        tx.update({"w": jnp.ones((3, 4, 2))}, state, losses=losses)


def test_stacked_gradients_without_per_component_raise_instead_of_growing_params():
    """Issue 15 item 2: stacked [K, ...] gradients given to the plain path used to broadcast
    into the parameters, which gained a leading axis at every step."""
    tx = optax.chain(softadapt(num_losses=K), optax.sgd(0.1))
    params = jnp.zeros(4)
    state = tx.init(params)
    with pytest.raises(
        ValueError, match=r"looks stacked per component: build the transform with per_component=True"
    ):
        tx.update(jnp.ones((K, 4)), state, params, losses=jnp.ones(K))
    with pytest.raises(ValueError, match=r"same tree structure"):
        tx.update({"a": jnp.ones(4)}, state, params, losses=jnp.ones(K))


def test_per_component_without_params_on_a_k_shaped_parameter_raises():
    """Issue 15 item 3: a plain gradient of a [K, 4] parameter was taken as stacked."""
    tx = softadapt(num_losses=K, per_component=True)
    params = jnp.zeros((K, 4))
    with pytest.raises(ValueError, match=r"per_component=True needs `params`"):
        tx.update(jnp.ones((K, 4)), tx.init(params), losses=jnp.ones(K))


# ----------------------------------------------------------------------------------------------
# dtypes and robustness
# ----------------------------------------------------------------------------------------------


def test_bfloat16_losses():
    def bf16_components(p):
        return loss_components(p).astype(jnp.bfloat16)

    tx = optax.chain(softadapt(0.1, num_losses=K, window=2), optax.adam(1e-2))

    @jax.jit
    def step(params, opt_state):
        w = get_weights(opt_state)
        (_, losses), grads = value_and_weighted_grad(bf16_components)(w, params)
        updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    params = init_params()
    opt_state = tx.init(params)
    seen = []
    for _ in range(3):
        params, opt_state, losses = step(params, opt_state)
        chex.assert_type(losses, jnp.bfloat16)
        seen.append(np.asarray(losses.astype(jnp.float32)))
    chex.assert_type(params["w1"], jnp.float32)
    chex.assert_tree_all_finite(params)
    (bal,) = find_balancer_states(opt_state)
    chex.assert_type([bal.history, bal.weights], jnp.float32)
    np.testing.assert_array_equal(bal.history, np.stack(seen[-2:]))
    expected = ref_weights(np.stack(seen[-2:]), 0.1, variant="loss_weighted")
    chex.assert_trees_all_close(get_weights(opt_state), expected, rtol=1e-6)


def test_nonfinite_losses_leave_state_and_weights_intact():
    tx = optax.chain(softadapt(0.1, num_losses=K, window=3, per_component=True), optax.sgd(1.0))
    params = jnp.zeros(2)
    update = jax.jit(tx.update)
    state = tx.init(params)
    per_component = jnp.ones((K, 2))
    for losses in LOSS_STREAM[:4]:
        _, state = update(per_component, state, params, losses=losses)
    for bad in [np.nan, np.inf, -np.inf]:
        (before,) = find_balancer_states(state)
        updates, state = update(per_component, state, params, losses=jnp.array([1.0, bad, 1.0], jnp.float32))
        (after,) = find_balancer_states(state)
        chex.assert_trees_all_equal(after._replace(rejected=before.rejected), before)
        assert int(after.rejected) == int(before.rejected) + 1
        chex.assert_trees_all_equal(get_weights(state), before.weights)
        # This step's update still used the held weights: -lr * sum_k w_k g_k.
        chex.assert_trees_all_close(updates, -jnp.full(2, jnp.sum(before.weights)), rtol=1e-6)
    assert int(after.rejected) == 3


# ----------------------------------------------------------------------------------------------
# checkpointing
# ----------------------------------------------------------------------------------------------


@functools.cache
def checkpoint_setup():
    """A chain with a scheduled beta and adam, and its jitted path-(b) step (compiled once)."""
    tx = optax.chain(
        optax.inject_hyperparams(softadapt, static_args=SOFTADAPT_STATIC_ARGS)(
            optax.linear_schedule(0.1, 1.0, 20), num_losses=K, window=3
        ),
        optax.adam(1e-2),
    )
    return tx, jax.jit(functools.partial(path_b_step, tx))


def test_flax_serialization_round_trip():
    tx, step = checkpoint_setup()
    params = init_params()
    state = tx.init(params)
    for _ in range(5):
        params, state = step(params, state)
    restored = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    assert float(jnp.max(jnp.abs(get_weights(restored) - 1.0 / K))) > 0  # a non-trivial state


def test_resume_from_mid_run_checkpoint_is_bitwise_identical():
    tx, step = checkpoint_setup()
    params0 = init_params()

    p, s = params0, tx.init(params0)
    for _ in range(20):
        p, s = step(p, s)
    full_params, full_state = p, s

    p, s = params0, tx.init(params0)
    for _ in range(10):
        p, s = step(p, s)
    blob = flax.serialization.to_bytes({"params": p, "opt_state": s})
    del p, s
    # As a fresh process would: templates from a new init and a new tx.init.
    template_params = init_params(seed=99)
    template = {"params": template_params, "opt_state": tx.init(template_params)}
    restored = flax.serialization.from_bytes(template, blob)
    p, s = restored["params"], restored["opt_state"]
    for _ in range(10):
        p, s = step(p, s)

    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(full_params), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(get_weights(s), get_weights(full_state))
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(full_state), strict=True):
        np.testing.assert_array_equal(a, b)
    # The resumed run crossed the scheduled-beta range and adapted.
    assert not np.allclose(get_weights(s), 1.0 / K, atol=1e-3)
