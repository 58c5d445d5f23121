"""jit_train_step: the statistic schedule decided on the host, equal to the on-device lax.cond."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_gradient_weighting import (
    X,
    backward_passes_per_step,
    counting_loss,
    init_params,
    loss_components,
    residuals,
)

import softadapt_jax as sj
from softadapt_jax import training
from softadapt_jax.balancers.base import make_balancer
from softadapt_jax.balancers.gradient_weighting import GradientWeightingState

FACTORIES = [sj.lr_annealing_balancer, sj.grad_norm_balancer, sj.ntk_balancer]
BAD_X = X.at[0, 0].set(jnp.nan)  # every loss non-finite: the balancer rejects the step


def make_state(balancer: sj.Balancer) -> training.BalancedTrainState:
    # apply_if_finite keeps the parameters of a non-finite step, so a run goes on after one.
    tx = optax.chain(sj.balance(balancer), optax.apply_if_finite(optax.adam(1e-2), 100))
    return training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)


def balancer_state(state: training.BalancedTrainState) -> sj.BalancerState:
    (bstate,) = sj.find_balancer_states(state.opt_state)
    return bstate


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("every, update_first", [(1, True), (3, True), (3, False)])
def test_equals_on_device_cond_with_rejected_steps(factory, every: int, update_first: bool) -> None:
    # Non-finite batches on recompute steps and around them: the balancer rejects them and stays
    # due, which the host copy of the schedule must not miss.
    bad_steps = {1, 2, 5, 6, 10}
    state = make_state(factory(num_losses=3, update_every=every, update_first=update_first))
    on_device = jax.jit(training.make_train_step(loss_components, residuals_fn=residuals))
    scheduled = training.jit_train_step(loss_components, residuals_fn=residuals)
    a, b = state, state
    for i in range(1, 16):
        batch = BAD_X if i in bad_steps else X
        a, metrics_a = on_device(a, batch)
        b, metrics_b = scheduled(b, batch)
        np.testing.assert_allclose(metrics_b["weights"], metrics_a["weights"], rtol=1e-5)
        assert bool(balancer_state(b).recompute_next) == bool(balancer_state(a).recompute_next)
    chex.assert_trees_all_close(b.params, a.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(balancer_state(b), balancer_state(a), rtol=1e-5)
    assert int(balancer_state(b).rejected) == len(bad_steps)
    assert not np.allclose(balancer_state(b).weights, 1.0)  # the statistic did run


@pytest.mark.parametrize("factory", [sj.lr_annealing_balancer, sj.grad_norm_balancer])
@pytest.mark.parametrize("statistic_at", ["updated", "current"])
def test_backward_passes_and_device_reads(factory, statistic_at: str) -> None:
    counter: list[int] = []
    step = training.jit_train_step(counting_loss(counter))
    state = make_state(factory(num_losses=3, update_every=4, statistic_at=statistic_at))
    calls = backward_passes_per_step(step, state, counter, 12)
    leaves = len(jax.tree.leaves(init_params()))
    # Steps 0, 4, 8 (0-based) recompute; every other step takes one backward pass. "current"
    # takes K = 3 passes there, "updated" the step's own pass and K = 3 at the new parameters.
    recompute = (4 if statistic_at == "updated" else 3) * leaves
    assert calls == [recompute, leaves, leaves, leaves] * 3
    # The counters are read once for the new state, then once after each recompute (the next
    # step has been asked for each time): 4 reads in 12 steps.
    assert step.syncs == 4


def test_hold_step_has_no_conditional() -> None:
    tx = optax.chain(sj.balance(sj.grad_norm_balancer(num_losses=3, update_every=4)), optax.adam(1e-2))
    state = training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)

    def primitives(recompute: bool | None) -> set[str]:
        jaxpr = jax.make_jaxpr(training.make_train_step(loss_components, recompute=recompute))(state, X)
        return {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}

    assert "cond" in primitives(None)
    assert "cond" not in primitives(False)
    assert "cond" not in primitives(True)


@pytest.mark.parametrize("window, every, accumulate", [(1, 4, 1), (3, 2, 2), (2, 5, 3)])
@pytest.mark.parametrize("update_first", [False, True])
def test_host_schedule_follows_the_balancer(
    window: int, every: int, accumulate: int, update_first: bool
) -> None:
    # The host copy against make_balancer's own counters, through accepted and rejected steps.
    def rule(history, initial, ms, stats):
        del history, initial
        return jnp.ones(2) + stats, ms

    ms = GradientWeightingState(ema=jnp.ones(2), schedule=(window, every, accumulate, update_first))
    bal = make_balancer(
        rule,
        num_losses=2,
        window=window,
        weights_sum=2.0,
        init_method_state=ms,
        update_every=every,
        accumulate=accumulate,
        statistic="grad_norm",
        update_first=update_first,
    )
    update = jax.jit(bal.update)
    state = bal.init()
    host = training._read_schedule(state)
    rng = np.random.default_rng(0)
    for _ in range(40):
        assert host.due == bool(state.recompute_next)
        accepted = rng.random() < 0.8
        losses = jnp.ones(2) if accepted else jnp.full(2, jnp.nan)
        _, state = update(losses, state, jnp.ones(2))
        if accepted:
            host = host.advanced()
        assert (host.count, host.filled, host.accum_count) == (
            int(state.count),
            int(state.filled),
            int(state.accum_count),
        )


def test_foreign_state_is_read_again() -> None:
    state = make_state(sj.grad_norm_balancer(num_losses=3, update_every=3))
    on_device = jax.jit(training.make_train_step(loss_components))
    step = training.jit_train_step(loss_components)
    for _ in range(4):
        state, _ = step(state, X)
    older = state
    for _ in range(4):
        state, _ = step(state, X)
    syncs = step.syncs
    # Going back to an older state (as after restoring a checkpoint): the schedule is read again.
    a, b = older, older
    for _ in range(5):
        a, _ = on_device(a, X)
        b, _ = step(b, X)
    assert step.syncs > syncs
    chex.assert_trees_all_close(b.params, a.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(balancer_state(b), balancer_state(a), rtol=1e-5)


def test_balancer_without_statistic_gets_the_plain_step() -> None:
    state = make_state(sj.softadapt_balancer(0.1, num_losses=3))
    on_device = jax.jit(training.make_train_step(loss_components))
    step = training.jit_train_step(loss_components, donate_state=True)
    a = state
    b = jax.tree.map(jnp.copy, state)  # the donated copy
    for _ in range(6):
        a, _ = on_device(a, X)
        b, _ = step(b, X)
    chex.assert_trees_all_equal(b.params, a.params)
    assert step.syncs == 0


def test_unknown_schedule_falls_back_to_the_cond_step() -> None:
    def rule(history, initial, ms, stats):
        del history, initial
        return jnp.sum(stats) / stats, ms

    bal = make_balancer(
        rule,
        num_losses=3,
        window=1,
        weights_sum=3.0,
        init_method_state=GradientWeightingState(ema=jnp.ones(3)),  # no schedule declared
        update_every=2,
        statistic="grad_norm",
    )
    state = make_state(bal)
    on_device = jax.jit(training.make_train_step(loss_components))
    step = training.jit_train_step(loss_components)

    def not_this_one(*args):
        raise AssertionError("without a declared schedule only the cond step may run")

    step.hold_step = step.recompute_step = not_this_one
    a, b = state, state
    for _ in range(5):
        a, _ = on_device(a, X)
        b, _ = step(b, X)
    chex.assert_trees_all_equal(b.params, a.params)


def test_recompute_must_be_none_or_bool() -> None:
    with pytest.raises(TypeError, match=r"`recompute` must be None, True or False, got 1\."):
        training.make_train_step(loss_components, recompute=1)


def test_precompile_then_run() -> None:
    state = make_state(sj.grad_norm_balancer(num_losses=3, update_every=2))
    step = training.jit_train_step(loss_components)
    step.precompile(state, X)
    for _ in range(3):
        state, metrics = step(state, X)
    chex.assert_tree_all_finite(metrics)
    assert int(balancer_state(state).count) == 3


def test_three_field_schedule_means_update_at_the_end_of_each_period() -> None:
    # Method states written before update_first existed declare (window, update_every, accumulate).
    ms = GradientWeightingState(ema=jnp.ones(2), schedule=(1, 3, 1))
    bal = make_balancer(
        lambda h, i, m, s: (jnp.ones(2), m),
        num_losses=2,
        window=1,
        weights_sum=2.0,
        init_method_state=ms,
        update_every=3,
        statistic="grad_norm",
    )
    host = training._read_schedule(bal.init())
    assert not host.update_first
    assert [host.due, host.advanced().due, host.advanced().advanced().due] == [False, False, True]
