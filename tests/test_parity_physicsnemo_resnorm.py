"""ResNorm against PhysicsNeMo-Sym (tests/data/physicsnemo_aggregators.json, method "ResNorm"), float64.

The reference is ``physicsnemo/sym/loss/aggregator.py`` of nvidia-physicsnemo-sym 2.4.0, driven on
a 2-16-1 tanh MLP with three losses for 50 steps, ``lmbda`` trained by the trainer's Adam(1e-2) as
a second param group. Two replays, each one jitted ``lax.scan``:

* open loop: the recorded per-step losses go through the transform; every recorded field of the
  aggregator (weights, balancing term, aggregated loss, lmbda's gradient, lmbda after the forward
  renormalisation and after the optimizer step, L(0)) is compared;
* closed loop: the model is rebuilt from the recorded initial parameters and trained with
  ``optax.chain(resnorm(...), optax.adam(1e-2))``; its losses must be the recorded ones at every
  step, which checks the weights' timing and the gradient the model receives.

Same closed-form algorithm and the same Adam in float64: ``rtol=1e-6``. ``atol=1e-12`` covers
only entries that are 0 in the reference (lmbda at step 0).
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_parity_physicsnemo_gradient import KEYS, model_losses, unflatten

from softadapt_jax.gradients.per_component import per_component_grads
from softadapt_jax.gradients.resnorm import (
    ResNormState,
    resnorm,
    resnorm_init,
    resnorm_step,
    resnorm_targets,
    resnorm_weights,
)

DATA = pathlib.Path(__file__).parent / "data" / "physicsnemo_aggregators.json"
RTOL, ATOL = 1e-6, 1e-12


@functools.cache
def _method() -> dict:
    return json.loads(DATA.read_text())["methods"]["ResNorm"]


def _close(actual, expected, what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected, np.float64), rtol=RTOL, atol=ATOL, err_msg=what
    )


def _rows(rows: list[dict], field: str, sub: str | None = None) -> np.ndarray:
    """``[T, K]``: a per-loss field (a dict by key, or a list in KEYS order under ``sub``)."""
    out = []
    for r in rows:
        value = r[field] if sub is None else r[field][sub]
        out.append([value[k] for k in KEYS] if isinstance(value, dict) else value)
    return np.array(out, np.float64)


def _case() -> tuple[dict, dict]:
    method = _method()
    (case,) = method["cases"]
    inputs = case["inputs"]
    assert inputs["loss_keys"] == list(KEYS) and "Adam lr=0.01" in inputs["optimizer"]
    assert inputs["kwargs"] == {} and method["config"]["defaults"] == {"alpha": 1.0}
    return inputs, case["expected"]


def test_open_loop_recorded_losses(x64) -> None:
    inputs, expected = _case()
    exp = expected["steps"]
    losses = _rows(inputs["steps"], "losses")
    tx = resnorm(num_losses=3)  # the defaults: alpha 1, Adam(1e-2)
    opt = optax.adam(1e-2)

    def body(state: ResNormState, loss: jax.Array):
        # Stacked "gradients" e_k: the transform's output is then the weight vector it applied.
        upd, new = tx.update({"g": jnp.eye(3)}, state, losses=loss)
        ref, info = resnorm_step(state, loss, optimizer=opt, alpha=1.0)
        same = jnp.all(
            jnp.stack(
                [jnp.all(a == b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref), strict=True)]
            )
        )
        return new, {
            "applied": upd["g"],
            "weights": state.weights,
            "objective": info.objective,
            "grad": info.grad,
            "param": new.param,
            "initial": new.initial_losses,
            "same": same,
        }

    out = jax.jit(lambda s, seq: jax.lax.scan(body, s, seq)[1])(tx.init(None), jnp.asarray(losses))
    assert bool(jnp.all(out["same"])), "the transform's state differs from resnorm_step's"
    weights = _rows(exp, "effective_weights")
    _close(out["weights"], weights, "effective_weights")
    _close(out["applied"], weights, "sum_k w_k e_k")
    _close(out["objective"], [e["remainder"] for e in exp], "remainder")
    _close(
        out["objective"] + jnp.sum(out["weights"] * losses, axis=1),
        [e["aggregated_loss"] for e in exp],
        "aggregated_loss",
    )
    _close(out["grad"], _rows(exp, "aggregator_param_grads", "lmbda"), "aggregator_param_grads.lmbda")
    _close(jnp.log(out["weights"]), _rows(exp, "state_after_forward", "lmbda"), "state_after_forward.lmbda")
    _close(
        out["param"], _rows(exp, "state_after_optimizer_step", "lmbda"), "state_after_optimizer_step.lmbda"
    )
    _close(out["param"][:-1], _rows(inputs["steps"][1:], "state_before", "lmbda"), "state_before.lmbda")
    _close(out["initial"], _rows(exp, "state_after_optimizer_step", "init_losses"), "init_losses")


@pytest.mark.parametrize("per_component", [True, False])
def test_closed_loop_trains_the_recorded_model(x64, per_component: bool) -> None:
    inputs, expected = _case()
    losses_fn = model_losses(inputs)
    params = unflatten(np.array(inputs["initial_params"]))
    tx = optax.chain(resnorm(num_losses=3, per_component=per_component), optax.adam(1e-2))
    stacked = per_component_grads(losses_fn)

    def body(carry, _):
        params, state = carry
        if per_component:
            losses, grads = stacked(params, None)
        else:
            weights = resnorm_weights(state)
            losses, vjp = jax.vjp(lambda p: losses_fn(p, None), params)
            (grads,) = vjp(weights)
        upd, state = tx.update(grads, state, params, losses=losses)
        return (optax.apply_updates(params, upd), state), (losses, state[0].weights)

    run = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=inputs["n_steps"])[1])
    losses, weights_after = run(params)
    _close(losses, _rows(inputs["steps"], "losses"), "model losses at every step")
    _close(weights_after[:-1], _rows(expected["steps"][1:], "effective_weights"), "effective_weights")


# --- properties ---------------------------------------------------------------------------------------


def test_weights_sum_to_k_and_favour_the_stalled_loss() -> None:
    losses = jnp.stack([jnp.ones(30), 0.8 ** jnp.arange(30), 0.5 ** jnp.arange(30)], axis=1)
    tx = resnorm(num_losses=3, weight_optimizer=optax.adam(0.05))

    def body(state, loss):
        _, state = tx.update(jnp.eye(3), state, losses=loss)
        return state, state.weights

    _, weights = jax.jit(lambda s: jax.lax.scan(body, s, losses))(tx.init(None))
    np.testing.assert_allclose(weights.sum(axis=1), 3.0, rtol=1e-5)
    assert np.all(np.asarray(weights) > 0)
    final = np.asarray(weights[-1])
    assert final[0] > final[1] > final[2]


def test_targets_use_the_unweighted_mean() -> None:
    losses, initial = jnp.array([2.0, 1.0, 0.5]), jnp.array([1.0, 2.0, 0.5])
    rates = np.array([2.0, 0.5, 1.0]) / np.mean([2.0, 0.5, 1.0])
    np.testing.assert_allclose(resnorm_targets(losses, initial, 2.0), np.mean(losses) * rates**2, rtol=1e-6)


def test_scale_invariance_and_huge_losses() -> None:
    """Below the overflow bound, Adam's weights do not depend on the losses' scale (up to its eps);
    far above it (2**100 in float32, whose squares overflow) they stay finite and sum to K."""
    seq = jnp.array([[1.0, 2.0], [0.9, 1.0], [0.8, 0.7], [0.85, 0.3]])
    tx = resnorm(num_losses=2)

    def run(scale):
        def body(state, loss):
            _, state = tx.update(jnp.eye(2), state, losses=loss * scale)
            return state, state.weights

        return jax.lax.scan(body, tx.init(None), seq)[1]

    small, scaled, huge = (jax.jit(run)(jnp.float32(s)) for s in (1.0, 2.0**20, 2.0**100))
    np.testing.assert_allclose(scaled, small, rtol=1e-5)
    assert np.all(np.isfinite(huge)) and np.all(np.asarray(huge) > 0)
    np.testing.assert_allclose(huge.sum(axis=1), 2.0, rtol=1e-5)
    np.testing.assert_array_equal(np.argsort(huge, axis=1), np.argsort(small, axis=1))


def test_nonfinite_losses_are_rejected_and_vmap_matches_loop() -> None:
    tx = resnorm(num_losses=2)
    update = jax.jit(lambda s, loss: tx.update(jnp.eye(2), s, losses=loss)[1])
    state = update(tx.init(None), jnp.array([1.0, 2.0]))
    bad = update(state, jnp.array([jnp.nan, 1.0]))
    assert int(bad.rejected) == 1 and int(bad.count) == int(state.count)
    np.testing.assert_array_equal(bad.param, state.param)
    np.testing.assert_array_equal(bad.weights, state.weights)

    batch = jnp.array([[0.5, 2.0], [3.0, 0.1]])
    states = jax.vmap(lambda loss: update(tx.init(None), loss))(batch)
    for i in range(2):
        one = update(tx.init(None), batch[i])
        np.testing.assert_allclose(states.weights[i], one.weights, rtol=1e-6)


def test_zero_initial_loss_gives_finite_weights() -> None:
    tx = resnorm(num_losses=2)
    update = jax.jit(lambda s, loss: tx.update(jnp.eye(2), s, losses=loss)[1])
    state = tx.init(None)
    for loss in ([0.0, 1.0], [0.5, 0.8], [0.2, 0.7]):
        state = update(state, jnp.array(loss))
    assert np.all(np.isfinite(state.weights)) and np.all(np.asarray(state.weights) > 0)


def test_init_dtype_follows_x64(x64) -> None:
    state = resnorm_init(3, optax.adam(1e-2))
    assert state.param.dtype == jnp.float64
    np.testing.assert_array_equal(state.param, 0.0)
    np.testing.assert_array_equal(state.weights, 1.0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="`num_losses`"):
        resnorm(num_losses=0)
    with pytest.raises(ValueError, match="`alpha` must be a finite number >= 0"):
        resnorm(num_losses=2, alpha=-1.0)
    with pytest.raises(ValueError, match="`per_component` must be a bool"):
        resnorm(num_losses=2, per_component=1)
    tx = resnorm(num_losses=2)
    with pytest.raises(ValueError, match="resnorm needs the current component losses"):
        tx.update(jnp.eye(2), tx.init(None))
    with pytest.raises(ValueError, match="leading axis of size 2"):
        tx.update(jnp.ones((3, 4)), tx.init(None), losses=jnp.ones(2))
    with pytest.raises(ValueError, match="ResNormState"):
        resnorm_weights(())
