"""The NNX train step: BatchNorm statistics and dropout RNG kept, one weighted backward pass, guarded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import softadapt_jax as sj
from softadapt_jax.flax.nnx import make_nnx_train_step

K = 2


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.dense1 = nnx.Linear(3, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.dense2 = nnx.Linear(8, K, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense2(self.drop(nnx.relu(self.norm(self.dense1(x)))))


def loss_components(model: Net, batch: dict[str, jax.Array]) -> jax.Array:
    y = model(batch["x"])
    return jnp.stack([jnp.mean((y[:, 0] - batch["y"]) ** 2), jnp.mean((y[:, 1] + batch["y"]) ** 2)])


def make(seed: int = 0, inner: optax.GradientTransformation | None = None) -> tuple[Net, nnx.Optimizer]:
    model = Net(nnx.Rngs(seed, dropout=seed + 1))
    tx = optax.chain(sj.softadapt(0.1, num_losses=K, window=3), inner or optax.adam(1e-2))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def batch(seed: int) -> dict[str, jax.Array]:
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return {"x": jax.random.normal(kx, (16, 3)), "y": jax.random.normal(ky, (16,))}


def pure(tree):
    return nnx.as_pure(nnx.state(tree))


def values(tree) -> list[np.ndarray]:
    """The leaves as NumPy arrays (PRNG keys as their key data)."""
    leaves = jax.tree.leaves(tree)
    return [
        np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for x in leaves
    ]


def test_step_updates_batch_stats_dropout_rng_and_balancer() -> None:
    model, optimizer = make()
    step = nnx.jit(make_nnx_train_step(loss_components))
    mean0 = np.asarray(model.norm.mean[...]).copy()
    stream = getattr(model.drop.rngs, "dropout", model.drop.rngs)  # Flax versions differ here
    key0 = np.asarray(jax.random.key_data(stream.key[...])).copy()
    count0 = int(stream.count[...])
    for i in range(4):
        metrics = step(model, optimizer, batch(i))
    assert not np.allclose(model.norm.mean[...], mean0)
    assert int(stream.count[...]) > count0
    np.testing.assert_array_equal(jax.random.key_data(stream.key[...]), key0)
    bstate = sj.find_balancer_states(nnx.as_pure(optimizer.opt_state))[0]
    assert int(bstate.count) == 4 and int(optimizer.step[...]) == 4
    np.testing.assert_allclose(jnp.sum(metrics["weights"]), 1.0, rtol=1e-5)
    assert not bool(metrics["skipped"])


def test_step_applies_the_gradient_of_the_weighted_sum() -> None:
    # SGD, not Adam: the first bias before BatchNorm has an exactly-zero gradient in exact
    # arithmetic, whose rounding noise Adam would blow up into full-size steps of either sign.
    model, optimizer = make(inner=optax.sgd(0.1))
    twin, twin_opt = make(inner=optax.sgd(0.1))
    step = nnx.jit(make_nnx_train_step(loss_components))
    for i in range(3):
        b = batch(i)
        weights = sj.get_weights(nnx.as_pure(twin_opt.opt_state))

        def total(m, b=b, weights=weights):
            losses = loss_components(m, b)
            return jnp.vdot(weights, losses), losses

        (_, losses), grads = nnx.value_and_grad(total, has_aux=True)(twin)
        twin_opt.update(twin, grads, losses=losses)
        metrics = step(model, optimizer, b)
        np.testing.assert_allclose(metrics["losses"], losses, rtol=1e-5, atol=1e-7)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(twin, nnx.Param)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.norm.mean[...], twin.norm.mean[...], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("poison", ["nan_input", "inf_target"])
def test_nonfinite_step_changes_nothing_but_the_counts(poison) -> None:
    model, optimizer = make()
    step = nnx.jit(make_nnx_train_step(loss_components))
    for i in range(2):
        step(model, optimizer, batch(i))
    bad = batch(5)
    if poison == "nan_input":
        bad["x"] = bad["x"].at[3, 1].set(jnp.nan)
    else:
        bad["y"] = bad["y"].at[0].set(jnp.inf)
    before_model, before_opt = pure(model), nnx.as_pure(optimizer.opt_state)
    metrics = step(model, optimizer, bad)
    assert bool(metrics["skipped"])
    for a, b in zip(values(pure(model)), values(before_model), strict=True):
        np.testing.assert_array_equal(a, b)
    after_opt = nnx.as_pure(optimizer.opt_state)
    old_b, new_b = sj.find_balancer_states(before_opt)[0], sj.find_balancer_states(after_opt)[0]
    assert int(new_b.rejected) == int(old_b.rejected) + 1
    assert int(optimizer.step[...]) == 2
    for a, b in zip(
        jax.tree.leaves(new_b._replace(rejected=old_b.rejected)), jax.tree.leaves(old_b), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # Training goes on from the untouched state.
    metrics = step(model, optimizer, batch(6))
    assert not bool(metrics["skipped"]) and np.all(np.isfinite(metrics["losses"]))


def test_without_guard_a_nan_step_poisons_the_parameters() -> None:
    # What the guard prevents: the unguarded step applies the nan gradient.
    model, optimizer = make()
    step = nnx.jit(make_nnx_train_step(loss_components, guard=False))
    bad = batch(0)
    bad["x"] = bad["x"].at[0, 0].set(jnp.nan)
    step(model, optimizer, bad)
    assert not np.all(np.isfinite(model.dense1.kernel[...]))


def test_optimizer_without_balancer_raises() -> None:
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(ValueError, match="exactly one weighting state"):
        make_nnx_train_step(loss_components)(model, optimizer, batch(0))
