"""Regression tests for the safety net (issue 15): inputs that used to corrupt weights or state silently.

Each test names the item of the issue it reproduces; each failed before its fix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softadapt_jax as sj
from softadapt_jax.balancers.base import make_balancer
from softadapt_jax.slopes import max_stable_order


def _newest(history, initial, method_state):
    del initial
    return history[-1], method_state


# ----------------------------------------------------------------------------- item 5: accumulation
@pytest.mark.parametrize(
    "factory",
    [
        lambda: sj.softadapt_balancer(0.1, num_losses=2, window=2, accumulate=2),
        lambda: sj.fixed_balancer(num_losses=2, accumulate=2),
        lambda: make_balancer(_newest, num_losses=2, window=1, weights_sum=2.0, accumulate=2),
    ],
)
def test_accumulating_huge_finite_losses_never_pushes_inf(factory) -> None:
    b = factory()
    state = b.init()
    for _ in range(4):
        _, state = jax.jit(b.update)(jnp.array([3e38, 1.0], jnp.float32), state)
    assert np.all(np.isfinite(np.asarray(state.history)))
    np.testing.assert_allclose(state.history[-1], [3e38, 1.0], rtol=1e-6)
    assert int(state.rejected) == 0 and int(state.count) == 4


# ----------------------------------------------------------------------------- item 6: constant history
@pytest.mark.parametrize(
    "options",
    [dict(variant="normalized"), dict(scale="relative"), dict(variant="normalized", scale="relative")],
)
def test_constant_history_gives_uniform_weights_under_jit(options) -> None:
    h = jnp.broadcast_to(jnp.array([0.3, 0.69, 2.13, 1e-3], jnp.float32), (5, 4))
    w = jax.jit(lambda h: sj.softadapt_weights(h, 10.0, **options))(h)
    np.testing.assert_allclose(w, np.full(4, 0.25), rtol=1e-6)
    slopes = jax.jit(lambda h: sj.rates_of_change(h, scale="relative"))(h)
    np.testing.assert_array_equal(slopes, np.zeros(4))


# ----------------------------------------------------------------------------- item 7: high orders
def test_default_order_is_capped_where_rounding_would_dominate() -> None:
    assert max_stable_order(jnp.float32) == 15
    assert max_stable_order(jnp.float64) >= 40
    for t in (16, 32, 40, 140):
        ramp = (1.0 + 0.01 * jnp.arange(t, dtype=jnp.float32))[:, None]
        np.testing.assert_allclose(sj.rates_of_change(ramp), [0.01], rtol=2e-2)


def test_explicit_order_above_the_cap_raises_naming_the_dtype() -> None:
    with pytest.raises(ValueError, match=r"`accuracy_order`=20 is too high for float32.*<= 15"):
        sj.rates_of_change(jnp.zeros((40, 2), jnp.float32), accuracy_order=20)
    with pytest.raises(ValueError, match=r"`accuracy_order`=20 is too high for float32"):
        sj.softadapt_weights(jnp.zeros((40, 2), jnp.float32), 0.1, accuracy_order=20)


def test_float64_keeps_the_original_default_order(x64) -> None:
    # The original's order T - 1 for every window the reference cases use (T <= 16).
    ramp = jnp.asarray(np.cumsum(np.linspace(1.0, 2.0, 16) ** 2)[:, None])
    exact = sj.rates_of_change(ramp, accuracy_order=15)
    np.testing.assert_array_equal(sj.rates_of_change(ramp), exact)


# ----------------------------------------------------------------------------- item 8: huge means
@pytest.mark.parametrize("scale", [3e37, 1e38, 3e38])
def test_loss_weighted_with_huge_finite_losses_keeps_its_weights(scale) -> None:
    h = jnp.array([[0.3, 1.0], [0.3, 1.0]], jnp.float32) * scale
    w = sj.softadapt_weights(h, 0.1, variant="loss_weighted")
    np.testing.assert_allclose(w, [0.3 / 1.3, 1.0 / 1.3], rtol=1e-5)


# ----------------------------------------------------------------------------- stable_softmax promises
def test_stable_softmax_priors_never_give_nan_or_negative_weights() -> None:
    x = jnp.array([1.0, 2.0, 0.5])
    w = sj.stable_softmax(x, 1.0, prior=jnp.array([jnp.inf, 1.0, 1.0]))
    np.testing.assert_allclose(w, [1.0, 0.0, 0.0], atol=1e-6)
    w = sj.stable_softmax(x, 1.0, prior=jnp.array([-1.0, 1.0, jnp.nan]))
    assert np.all(np.asarray(w) >= 0) and np.isfinite(np.asarray(w)).all()
    np.testing.assert_allclose(w, [0.0, 1.0, 0.0], atol=1e-7)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (3, ValueError, r"`x` must be a \[K\] vector of scores with K >= 1, got shape \(\)"),
        (jnp.zeros((0,)), ValueError, r"got shape \(0,\)"),
        (jnp.zeros((2, 2)), ValueError, r"got shape \(2, 2\)"),
        ("ab", TypeError, r"`x` must be a numeric array"),
    ],
)
def test_stable_softmax_bad_input_names_the_argument(x, error, match) -> None:
    with pytest.raises(error, match=match):
        sj.stable_softmax(x)


def test_stable_softmax_takes_lists_and_ints() -> None:
    np.testing.assert_allclose(sj.stable_softmax([1, 2]), sj.stable_softmax(jnp.array([1.0, 2.0])))


# ----------------------------------------------------------------------------- layouts
def test_components_major_history_is_named_when_num_losses_is_given() -> None:
    h = jnp.ones((3, 7))  # K=3 components, T=7 steps: the original's layout
    with pytest.raises(ValueError, match=r"looks components-major \[K, T\]: pass `history.T`"):
        sj.softadapt_weights(h, 0.1, num_losses=3)
    assert sj.softadapt_weights(h.T, 0.1, num_losses=3).shape == (3,)


# ----------------------------------------------------------------------------- item 11: traced set-point
def test_traced_negative_setpoint_never_gives_negative_weights() -> None:
    @jax.jit
    def run(setpoint):
        b = sj.fixed_balancer(num_losses=3, setpoint=setpoint)
        w, _ = b.update(jnp.ones(3), b.init())
        return w

    w = run(jnp.array([-1.0, 2.0, jnp.nan]))
    np.testing.assert_array_equal(w, [0.0, 2.0, 0.0])


def test_inject_hyperparams_setpoint_schedule_going_negative() -> None:
    schedule = optax.linear_schedule(1.0, -1.0, transition_steps=4)
    tx = optax.inject_hyperparams(sj.softadapt, static_args=sj.SOFTADAPT_STATIC_ARGS)(
        0.1, num_losses=2, window=2, setpoint=lambda count: jnp.stack([schedule(count), jnp.ones(())])
    )
    params = jnp.zeros(2)
    state = tx.init(params)
    update = jax.jit(lambda s: tx.update(jnp.zeros(2), s, params, losses=jnp.array([1.0, 2.0])))
    for _ in range(8):
        _, state = update(state)
        assert np.all(np.asarray(sj.get_weights(state)) >= 0)


# ----------------------------------------------------------------------------- item 9: GradNorm
@pytest.mark.parametrize("convention", ["libmtl", "physicsnemo", "paper"])
def test_gradnorm_skips_nonfinite_updates_instead_of_poisoning_its_state(convention) -> None:
    tx = sj.gradnorm(num_losses=2, layer=lambda p: p, convention=convention)
    params = jnp.zeros(3)
    state = tx.init(params)
    grads = jnp.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    update = jax.jit(lambda g, s, losses: tx.update(g, s, params, losses=losses))
    # A nan loss at the very first update, then a nan gradient entry.
    _, state = update(grads, state, jnp.array([jnp.nan, 1.0]))
    assert int(state.rejected) == 1 and int(state.count) == 0
    _, state = update(grads.at[1, 2].set(jnp.nan), state, jnp.array([1.0, 2.0]))
    assert int(state.rejected) == 2 and int(state.count) == 0
    for _ in range(3):
        out, state = update(grads, state, jnp.array([1.0, 2.0]))
    assert int(state.count) == 3
    for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.all(np.isfinite(np.asarray(out)))


# ----------------------------------------------------------------------------- unclear errors
def test_absurd_window_is_refused_with_its_size() -> None:
    with pytest.raises(ValueError, match=r"`window`=1000000000000 would make a loss history of .* GiB"):
        sj.softadapt_balancer(0.1, num_losses=3, window=10**12)
    with pytest.raises(ValueError, match=r"`window`=1000000000000"):
        sj.softadapt(0.1, num_losses=3, window=10**12)


# ----------------------------------------------------------------------------- gradients of the weights
@pytest.mark.parametrize("beta", [0.1, 10.0])
def test_grad_of_log_scale_weights_is_finite_at_zero_losses(beta) -> None:
    grad = jax.jit(jax.grad(lambda h: sj.softadapt_weights(h, beta, scale="log")[0]))
    for h in (jnp.zeros((3, 2)), jnp.array([[0.0, 1.0], [0.0, 0.5], [0.0, 0.2]])):
        g = grad(h)
        assert np.all(np.isfinite(np.asarray(g))), g


@pytest.mark.parametrize("scale", [1.0, 1e20])
def test_grad_of_log_scale_weights_matches_finite_differences(x64, scale) -> None:
    h = jnp.array([[1.0, 1.0], [2.0, 0.5], [3.0, 0.2]], jnp.float64) * scale

    @jax.jit  # one compile for the twelve evaluations below
    def f(h):
        return sj.softadapt_weights(h, 2.0, scale="log")[0]

    g = np.asarray(jax.grad(f)(h))
    step = 1e-6
    numeric = np.array(
        [
            [
                (f(h.at[i, j].multiply(1 + step)) - f(h.at[i, j].multiply(1 - step))) / (2 * step * h[i, j])
                for j in range(2)
            ]
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-12 / scale)


# ----------------------------------------------------------------------------- item 4: uncertainty
@pytest.mark.parametrize("convention", ["libmtl", "physicsnemo"])
def test_uncertainty_weights_keep_adapting_after_one_extreme_loss(convention) -> None:
    b = sj.uncertainty_balancer(num_losses=2, convention=convention, optimizer=optax.adam(1e-2))
    state = b.init()
    update = jax.jit(b.update)
    for _ in range(3):
        _, state = update(jnp.array([1.0, 2.0]), state)
    _, state = update(jnp.array([1e20, 2.0]), state)
    for leaf in jax.tree.leaves(state.method_state):
        assert np.all(np.isfinite(np.asarray(leaf)))
    w_after_spike = np.asarray(state.weights)
    for _ in range(20):
        w, state = update(jnp.array([3.0, 2.0]), state)  # away from its stationary point
    assert abs(float(w[0]) - float(w_after_spike[0])) > 1e-3  # the first weight still moves


@pytest.mark.parametrize("factory", [sj.rlw_balancer, sj.relobralo_balancer])
def test_seed_beyond_64_bits_is_a_clear_error(factory) -> None:
    with pytest.raises(
        ValueError, match=r"`seed` must be an integer in \[0, 2\*\*63 - 1\], got 18446744073709551616"
    ):
        factory(num_losses=2, seed=2**64)
    factory(num_losses=2, seed=2**63 - 1).init()


# ----------------------------------------------------------------------------- item 1: the Linen step guard
def _linen_state(tx):
    from softadapt_jax import training

    params = {"w": jnp.array([0.5, -0.3, 0.8])}
    return training.BalancedTrainState.create(apply_fn=None, params=params, tx=tx)


def _log_losses(params, batch):
    pred = batch["x"] @ params["w"]
    # log of 0 when the batch asks for it: a nan that arises inside the computation, in the
    # loss and in its gradient.
    return jnp.stack([jnp.mean((pred - batch["y"]) ** 2), -jnp.mean(jnp.log(batch["p"] * pred**2))])


def test_linen_step_skips_a_step_whose_loss_turns_nan() -> None:
    from softadapt_jax import training

    tx = optax.chain(sj.softadapt(0.1, num_losses=2, window=3), optax.adam(1e-2))
    state = _linen_state(tx)
    step = jax.jit(training.make_train_step(_log_losses))
    good = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4), "p": jnp.full(4, 0.5)}
    bad = {**good, "p": good["p"].at[1].set(0.0)}
    for _ in range(3):
        state, _ = step(state, good)
    before = state
    state, metrics = step(state, bad)
    assert bool(metrics["skipped"]) and int(state.step) == int(before.step)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before.params), strict=True):
        np.testing.assert_array_equal(a, b)
    (b_old,), (b_new,) = sj.find_balancer_states(before.opt_state), sj.find_balancer_states(state.opt_state)
    assert int(b_new.rejected) == int(b_old.rejected) + 1
    for _ in range(3):
        state, metrics = step(state, good)
    assert not bool(metrics["skipped"])
    assert np.all(np.isfinite(np.asarray(state.params["w"])))


def test_unguarded_linen_step_shows_what_the_guard_prevents() -> None:
    from softadapt_jax import training

    tx = optax.chain(sj.softadapt(0.1, num_losses=2, window=3), optax.adam(1e-2))
    state = _linen_state(tx)
    step = jax.jit(training.make_train_step(_log_losses, guard=False))
    bad = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4), "p": jnp.zeros(4)}
    state, _ = step(state, bad)
    assert not np.all(np.isfinite(np.asarray(state.params["w"])))


def test_flax_train_state_is_named_in_the_error() -> None:
    from flax.training import train_state

    from softadapt_jax import training

    tx = optax.chain(sj.softadapt(0.1, num_losses=2), optax.sgd(0.1))
    state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros(3)}, tx=tx)
    with pytest.raises(
        TypeError, match=r"must be a softadapt_jax.training.BalancedTrainState, got TrainState"
    ):
        training.make_train_step(_log_losses)(state, {})


def test_pmap_batch_without_device_axis_names_shard_batch() -> None:
    from softadapt_jax import training

    tx = optax.chain(sj.softadapt(0.1, num_losses=2), optax.sgd(0.1))
    state = training.replicate(_linen_state(tx))
    pstep = training.make_pmap_train_step(_log_losses)
    batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros(8), "p": jnp.ones(8)}
    with pytest.raises(ValueError, match=r"leading axis of the 4 local devices.*shard_batch\(batch\)"):
        pstep(state, batch)
    with pytest.raises(ValueError, match=r"`state`.*replicate\(state\)"):
        pstep(_linen_state(tx), training.shard_batch(batch))


@pytest.mark.parametrize("shape", [(), (3,), (3, 2)])
def test_statistic_of_the_wrong_shape_names_the_argument(shape) -> None:
    b = sj.inverse_grad_norm_balancer(num_losses=2, update_every=1)
    with pytest.raises(
        ValueError, match=r"`statistics` for the grad_norm balancer must have one row per weight group"
    ):
        b.update(jnp.ones(2), b.init(), jnp.ones(shape))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["loss", "f32", "f16", "scalar"])
def test_all_finite_sees_a_non_finite_value_in_any_leaf_of_any_dtype(bad, where) -> None:
    # The check concatenates leaves per dtype; a mixed tree must still be read leaf for leaf.
    trees = {
        "loss": jnp.ones(3, jnp.float32),
        "f32": {"w": jnp.ones((4, 5), jnp.float32), "b": jnp.zeros(5, jnp.float32)},
        "f16": jnp.ones((2, 2), jnp.float16),
        "scalar": jnp.float32(2.0),
        "ints": jnp.arange(3),  # integer leaves are ignored
    }
    check = jax.jit(lambda t: sj.guard.all_finite(*t.values()))
    assert bool(check(trees))
    leaf = trees[where]
    if isinstance(leaf, dict):
        leaf = {**leaf, "w": leaf["w"].at[3, 1].set(bad)}
    else:
        leaf = jnp.asarray(leaf).at[(0,) * jnp.ndim(leaf)].set(bad)
    assert not bool(check({**trees, where: leaf}))


def test_all_finite_of_nothing_floating_is_true() -> None:
    assert bool(sj.guard.all_finite()) and bool(sj.guard.all_finite({"n": jnp.arange(2)}, None))
