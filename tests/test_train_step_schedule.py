"""The one train step: its statistic schedule comes from the Balancer it is given."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_gradient_weighting import X, init_params, loss_components, residuals

import softadapt_jax as sj
from softadapt_jax import training
from softadapt_jax.balancers.base import make_balancer, recompute_due
from softadapt_jax.balancers.gradient_weighting import GradientWeightingState


def make_state(balancer: sj.Balancer) -> training.BalancedTrainState:
    tx = optax.chain(sj.balance(balancer), optax.adam(1e-2))
    return training.BalancedTrainState.create(apply_fn=None, params=init_params(), tx=tx)


def test_forced_steps_have_no_conditional() -> None:
    bal = sj.inverse_grad_norm_balancer(num_losses=3, update_every=4)
    state = make_state(bal)

    def primitives(recompute: bool | None) -> set[str]:
        step = training.make_train_step(loss_components, balancer=bal, recompute=recompute)
        return {eqn.primitive.name for eqn in jax.make_jaxpr(step)(state, X).jaxpr.eqns}

    assert "cond" in primitives(None)
    assert "cond" not in primitives(False)
    assert "cond" not in primitives(True)


@pytest.mark.parametrize("window, every, accumulate", [(1, 4, 1), (3, 2, 2), (2, 5, 3)])
@pytest.mark.parametrize("update_first", [False, True])
def test_recompute_due_on_host_ints_is_the_balancers_schedule(
    window: int, every: int, accumulate: int, update_first: bool
) -> None:
    # Host code lays steps out with recompute_due on Python ints; it must say what the state says,
    # through accepted and rejected steps.
    def rule(history, initial, ms, stats):
        del history, initial
        return jnp.ones(2) + stats, ms

    bal = make_balancer(
        rule,
        num_losses=2,
        window=window,
        weights_sum=2.0,
        init_method_state=GradientWeightingState(ema=jnp.ones(2)),
        update_every=every,
        accumulate=accumulate,
        statistic="grad_norm",
        update_first=update_first,
    )
    assert bal.schedule == (window, every, accumulate, update_first)
    update = jax.jit(bal.update)
    state = bal.init()
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        host = recompute_due(bal.schedule, int(state.count), int(state.filled), int(state.accum_count))
        assert isinstance(host, bool)
        assert host == bool(state.recompute_next)
        seen.add(host)
        losses = jnp.ones(2) if rng.random() < 0.8 else jnp.full(2, jnp.nan)
        _, state = update(losses, state, jnp.ones(2))
    assert seen == {True, False}


def test_statistic_balancer_without_balancer_argument_is_an_error() -> None:
    state = make_state(sj.inverse_grad_norm_balancer(num_losses=3))
    with pytest.raises(ValueError, match=r"gradient-statistics balancer.*got no `balancer`"):
        jax.jit(training.make_train_step(loss_components, residuals_fn=residuals))(state, X)


def test_balancer_that_matches_no_state_is_an_error() -> None:
    state = make_state(sj.inverse_grad_norm_balancer(num_losses=3))
    other = sj.ntk_balancer(num_losses=2)
    with pytest.raises(ValueError, match=r"must match exactly one balancer state.*found 0"):
        jax.jit(training.make_train_step(loss_components, balancer=other, residuals_fn=residuals))(state, X)


def test_balancer_argument_type_is_checked() -> None:
    with pytest.raises(TypeError, match=r"`balancer` must be a Balancer or None, got str"):
        training.make_train_step(loss_components, balancer="grad_norm")
    with pytest.raises(TypeError, match=r"`recompute` must be None, True or False, got 1"):
        training.make_train_step(loss_components, recompute=1)


def test_loss_statistics_balancer_needs_no_balancer_argument() -> None:
    state = make_state(sj.softadapt_balancer(num_losses=3))
    new, metrics = jax.jit(training.make_train_step(loss_components))(state, X)
    assert int(new.step) == 1 and metrics["weights"].shape == (3,)
