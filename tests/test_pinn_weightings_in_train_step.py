"""SA-PINN's point weights and jaxpi's causal weighting inside the library's one train step.

Neither method needs a train step of its own: SA-PINN's weights are part of the
parameters (``{"net": ..., "sa": SelfAdaptiveState}``, stepped by
``sa_optimizer``), causal weighting is part of the loss function. Both compose
with a loss balancer in ``make_train_step``: the balancer sees the K term
losses, the network descends their weighted sum, the point weights ascend it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softadapt_jax as sj
from softadapt_jax import causal, training
from softadapt_jax import self_adaptive as sa

# u' = -u on [0, 1], u(0) = 1 (u = exp(-t)): one residual term and one initial-value term.
T = jnp.linspace(0.0, 1.0, 32)


def init_net(key: jax.Array, width: int = 16) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (1, width)),
        "b1": jnp.zeros(width),
        "w2": jax.random.normal(k2, (width, 1)) / np.sqrt(width),
        "b2": jnp.zeros(()),
    }


def u(net: dict[str, jax.Array], t: jax.Array) -> jax.Array:
    return (jnp.tanh(t[:, None] @ net["w1"] + net["b1"]) @ net["w2"])[:, 0] + net["b2"]


def residual(net: dict[str, jax.Array], t: jax.Array) -> jax.Array:
    du = jax.vmap(jax.grad(lambda s: u(net, s[None])[0]))(t)
    return du + u(net, t)


def sa_losses(params: dict, t: jax.Array) -> jax.Array:
    net = params["net"]
    _, per_term = sa.sa_loss({"res": residual(net, t), "ic": u(net, jnp.zeros(1)) - 1.0}, params["sa"])
    return jnp.stack([per_term["res"], per_term["ic"]])


def causal_losses(net: dict, t: jax.Array) -> jax.Array:
    res = causal.causal_residual_loss(residual(net, t), 4, 1.0)
    return jnp.stack([res, jnp.mean((u(net, jnp.zeros(1)) - 1.0) ** 2)])


def train(step, state, num_steps: int):
    """``num_steps`` steps in one compiled loop; the last step's metrics."""

    def body(_, carry):
        return step(carry[0], T)

    return jax.jit(lambda s: jax.lax.fori_loop(0, num_steps - 1, body, step(s, T)))(state)


def error(net: dict) -> float:
    return float(jnp.max(jnp.abs(u(net, T) - jnp.exp(-T))))


def test_sa_pinn_weights_and_a_balancer_in_one_step() -> None:
    params = {"net": init_net(jax.random.PRNGKey(0)), "sa": sa.sa_init({"res": T.size, "ic": 1})}
    balancer = sj.softadapt_balancer(num_losses=2)
    tx = sa.sa_optimizer(optax.chain(sj.balance(balancer), optax.adam(1e-2)), optax.sgd(1e-1))
    state = training.BalancedTrainState.create(apply_fn=None, params=params, tx=tx)
    step = training.make_train_step(sa_losses)

    # The point weights ascend: with SGD their step is exactly +lr * dL/dlambda, and dL/dlambda >= 0.
    weights = state.weights
    grad_sa = jax.grad(lambda p: jnp.dot(weights, sa_losses(p, T)))(state.params)["sa"]
    new_state, metrics = jax.jit(step)(state, T)
    for term in ("res", "ic"):
        expected = state.params["sa"].weights[term] + 0.1 * grad_sa.weights[term]
        np.testing.assert_allclose(new_state.params["sa"].weights[term], expected, rtol=1e-6)
        assert np.all(np.asarray(grad_sa.weights[term]) >= 0)
    assert not bool(metrics["skipped"])

    err0 = error(state.params["net"])
    new_state, metrics = train(step, new_state, 200)
    # The balancer saw the losses (its window filled and the weights moved off uniform), the
    # network learned, and every weight stayed finite.
    assert not np.allclose(np.asarray(metrics["weights"]), 0.5)
    assert np.all((np.asarray(metrics["weights"]) > 0) & (np.asarray(metrics["weights"]) < 1))
    assert error(new_state.params["net"]) < 0.5 * err0
    assert all(np.all(np.isfinite(np.asarray(w))) for w in new_state.params["sa"].weights.values())


@pytest.mark.parametrize("balancer", ["lr_annealing", "softadapt"])
def test_causal_loss_with_a_balancer_in_one_step(balancer: str) -> None:
    if balancer == "lr_annealing":
        b = sj.lr_annealing_balancer(num_losses=2, update_every=10)
    else:
        b = sj.softadapt_balancer(num_losses=2)
    tx = optax.chain(sj.balance(b), optax.adam(1e-2))
    state = training.BalancedTrainState.create(apply_fn=None, params=init_net(jax.random.PRNGKey(1)), tx=tx)
    err0 = error(state.params)
    state, metrics = train(training.make_train_step(causal_losses, balancer=b), state, 200)
    assert error(state.params) < 0.5 * err0
    w = np.asarray(metrics["weights"])
    assert np.all(np.isfinite(w)) and not np.allclose(w, w[0])
