"""GradNorm against the original implementations, replayed step by step.

* ``convention="libmtl"`` (the default): the GradNorm sequence cases of
  ``tests/data/libmtl_weightings.json`` (LibMTL git 4336804, ``LibMTL/weighting/GradNorm.py``,
  K = 3 and 4, 20 steps, one batch per epoch, ``loss_scale`` stepped by SGD(lr=0.1)).
* ``convention="physicsnemo"``: the GradNorm cases of ``tests/data/physicsnemo_aggregators.json``
  (PhysicsNeMo-Sym 2.4.0, ``physicsnemo/sym/loss/aggregator.py``, K = 3, 50 steps, ``lmbda`` in the
  trainer's Adam(lr=1e-2) param group).

Each case's recorded per-step losses and gradients are fed to the transform inside one jitted
``lax.scan`` (one compilation per case) and every recorded field is compared in float64 at
``rtol=1e-6``. The algorithm is the same closed-form computation in both libraries, so no solver
tolerance is involved; ``atol=1e-12`` only covers entries that are exactly 0 in the reference
(the zero gradients of LibMTL's first epoch) or cancel to rounding level.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softadapt_jax.gradients.gradnorm import (
    GRADNORM_CONVENTIONS,
    GradNormState,
    _gradnorm_step,
    component_norms,
    gradnorm,
    gradnorm_init,
)

DATA = pathlib.Path(__file__).parent / "data"
RTOL, ATOL = 1e-6, 1e-12


@functools.cache
def _methods(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())["methods"]


def _close(actual: Any, expected: Any, what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected, np.float64), rtol=RTOL, atol=ATOL, err_msg=what
    )


def _replay(
    tx: optax.GradientTransformationExtraArgs,
    layer: str,
    losses: np.ndarray,
    grads: np.ndarray,
    step_kwargs: dict[str, Any],
) -> dict[str, jax.Array]:
    """Feeds T steps of (losses [T, K], per-component layer gradients [T, K, n]) through ``tx``.

    Besides the transform's outputs, every step also runs ``_gradnorm_step`` on the same state for
    the objective value and its gradient (which the transform does not return), and checks that
    its new state is the transform's.
    """

    def body(state: GradNormState, xs: tuple[jax.Array, jax.Array]) -> tuple[GradNormState, dict]:
        loss, grad = xs
        upd, new = tx.update({layer: grad}, state, losses=loss)
        ref, info = _gradnorm_step(state, loss, component_norms({layer: grad}, layer), **step_kwargs)
        same = jax.tree.map(lambda a, b: jnp.all(a == b), new, ref)
        out = {
            "combined": upd[layer],
            "weights_used": state.weights,
            "param_after": new.param,
            "initial": new.initial_losses,
            "objective": info.objective,
            "grad": info.grad,
            "same_state": jnp.all(jnp.stack(jax.tree.leaves(same))),
        }
        return new, out

    run = jax.jit(lambda s, l, g: jax.lax.scan(body, s, (l, g))[1])
    out = run(tx.init(None), jnp.asarray(losses), jnp.asarray(grads))
    assert bool(jnp.all(out["same_state"])), "the transform's state differs from _gradnorm_step's"
    return out


@pytest.mark.parametrize("case_id", ["GradNorm-seq00", "GradNorm-seq01"])
def test_libmtl_sequence(x64: None, case_id: str) -> None:
    method = _methods("libmtl_weightings.json")["GradNorm"]
    case = next(c for c in method["cases"] if c["id"] == case_id)
    steps, expected = case["inputs"]["per_step"], case["expected"]["per_step"]
    k, alpha = case["inputs"]["K"], method["constructor_args"]["alpha"]
    assert case["inputs"]["steps_per_epoch"] == 1
    assert "SGD(lr=0.1)" in case["inputs"]["optimizer_on_method_params"]
    losses = np.array([s["losses"] for s in steps])
    grads = np.array([s["grads"] for s in steps])
    tx = gradnorm(num_losses=k, layer="theta")  # the defaults: convention="libmtl", alpha 1.5, SGD(0.1)
    out = _replay(tx, "theta", losses, grads, {"optimizer": optax.sgd(0.1), "alpha": alpha})

    _close(out["combined"], [e["combined_grad"] for e in expected], "combined_grad")
    _close(out["weights_used"], [e["returned_weights"] for e in expected], "returned_weights")
    _close(out["param_after"], [e["loss_scale_after_sgd"] for e in expected], "loss_scale_after_sgd")
    _close(out["param_after"][:-1], [s["loss_scale_before"] for s in steps[1:]], "loss_scale_before")
    # L(0) is the epoch-0 column of the Trainer's train_loss_buffer.
    buffer_col0 = np.broadcast_to(expected[0]["train_loss_buffer_col_after_epoch"], (len(steps), k))
    _close(out["initial"], buffer_col0, "train_loss_buffer[:, 0]")
    epoch0 = np.array([s["epoch"] == 0 for s in steps])
    # Epoch 0 backpropagates the plain sum and leaves loss_scale without a gradient ...
    assert all(e["loss_scale.grad"] is None for e, z in zip(expected, epoch0) if z)
    np.testing.assert_array_equal(out["grad"][epoch0], 0.0)
    first = [e for e, z in zip(expected, epoch0) if z]
    _close(losses[epoch0].sum(axis=1), [e["last_backward_scalar"] for e in first], "last_backward_scalar")
    # ... later epochs backpropagate L_grad into loss_scale last.
    later = [e for e, z in zip(expected, epoch0) if not z]
    _close(out["grad"][~epoch0], [e["loss_scale.grad"] for e in later], "loss_scale.grad")
    _close(out["objective"][~epoch0], [e["last_backward_scalar"] for e in later], "last_backward_scalar")


@pytest.mark.parametrize("case_id", ["gradnorm_default_alpha1", "gradnorm_alpha0.5"])
def test_physicsnemo_sequence(x64: None, case_id: str) -> None:
    method = _methods("physicsnemo_aggregators.json")["GradNorm"]
    case = next(c for c in method["cases"] if c["id"] == case_id)
    inputs, expected = case["inputs"], case["expected"]["steps"]
    keys = inputs["loss_keys"]
    assert inputs["grads_are_wrt"].startswith("params[-2]") and "Adam lr=0.01" in inputs["optimizer"]
    alpha = inputs["kwargs"].get("alpha", method["config"]["defaults"]["alpha"])

    def per_key(rows: list[dict], field: str, sub: str | None = None) -> np.ndarray:
        return np.array([[(r[field] if sub is None else r[field][sub])[key] for key in keys] for r in rows])

    losses, grads = per_key(inputs["steps"], "losses"), per_key(inputs["steps"], "grads")
    # Only alpha is passed; convention="physicsnemo" supplies lmbda = 0 and Adam(1e-2).
    tx = gradnorm(num_losses=len(keys), layer="w", convention="physicsnemo", **inputs["kwargs"])
    step_kwargs = {"optimizer": optax.adam(1e-2), "alpha": alpha, "convention": "physicsnemo"}
    out = _replay(tx, "w", losses, grads, step_kwargs)

    weights = per_key(expected, "effective_weights")
    _close(out["weights_used"], weights, "effective_weights")
    _close(out["combined"], np.einsum("tk,tkn->tn", weights, grads), "sum_k w_k dL_k/dparams[-2]")
    _close(out["objective"], [e["remainder"] for e in expected], "remainder")
    aggregated = out["objective"] + jnp.sum(out["weights_used"] * losses, axis=1)
    _close(aggregated, [e["aggregated_loss"] for e in expected], "aggregated_loss")
    _close(out["grad"], [e["aggregator_param_grads"]["lmbda"] for e in expected], "aggregator_param_grads")
    after_forward = [e["state_after_forward"]["lmbda"] for e in expected]  # the renormalised lmbda
    _close(jnp.log(out["weights_used"]), after_forward, "state_after_forward.lmbda")
    after_step = [e["state_after_optimizer_step"]["lmbda"] for e in expected]
    _close(out["param_after"], after_step, "state_after_optimizer_step.lmbda")
    _close(out["initial"], [e["state_after_optimizer_step"]["init_losses"] for e in expected], "init_losses")
    before = [s["state_before"]["lmbda"] for s in inputs["steps"][1:]]
    _close(out["param_after"][:-1], before, "state_before.lmbda")


# --- properties of every convention -------------------------------------------------------------------


def _toy_sequence(k: int = 3, t: int = 12, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Component 0 stalls while the others halve every step; gradients of different scales."""
    rng = np.random.default_rng(3)
    losses = np.stack([np.ones(t)] + [0.5 ** np.arange(t)] * (k - 1), axis=1)
    grads = rng.normal(size=(t, k, n)) * np.array([1.0, 3.0, 0.3])[:k, None]
    return losses, grads


@pytest.mark.parametrize("convention", GRADNORM_CONVENTIONS)
def test_weights_positive_sum_to_k_and_favour_the_slow_component(convention: str) -> None:
    losses, grads = _toy_sequence()
    tx = gradnorm(num_losses=3, layer="g", convention=convention, weight_optimizer=optax.adam(0.05))

    def body(state, xs):
        _, state = tx.update({"g": xs[1]}, state, losses=xs[0])
        return state, state.weights

    final, weights = jax.jit(lambda s: jax.lax.scan(body, s, (jnp.asarray(losses), jnp.asarray(grads))))(
        tx.init(None)
    )
    np.testing.assert_allclose(weights.sum(axis=1), 3.0, rtol=1e-5)
    assert np.all(np.asarray(weights) > 0)
    assert float(final.weights[0]) > 1.0
    np.testing.assert_allclose(final.initial_losses, losses[0], rtol=1e-6)


def test_libmtl_initial_steps_hold_the_weights_and_average_l0() -> None:
    losses, grads = _toy_sequence(t=6)
    n0 = 3
    tx = gradnorm(num_losses=3, layer="g", initial_steps=n0)
    state = tx.init(None)
    update = jax.jit(tx.update)
    for t in range(n0):
        upd, state = update({"g": grads[t]}, state, losses=losses[t])
        np.testing.assert_allclose(upd["g"], grads[t].sum(axis=0), rtol=1e-6)  # the plain sum
        np.testing.assert_array_equal(state.param, 1.0)
        np.testing.assert_array_equal(state.weights, 1.0)
    np.testing.assert_allclose(state.initial_losses, losses[:n0].mean(axis=0), rtol=1e-6)
    _, state = update({"g": grads[n0]}, state, losses=losses[n0])
    assert not np.allclose(state.param, 1.0)
    np.testing.assert_allclose(state.initial_losses, losses[:n0].mean(axis=0), rtol=1e-6)


def test_physicsnemo_renormalises_before_the_step() -> None:
    """An lmbda that does not sum to K in exp is shifted first; the optimizer steps from there."""
    tx = gradnorm(num_losses=2, layer="g", convention="physicsnemo", weight_optimizer=optax.sgd(0.0))
    state = tx.init(None)._replace(param=jnp.array([1.0, 2.0]))
    _, new = jax.jit(tx.update)({"g": jnp.ones((2, 3))}, state, losses=jnp.ones(2))
    np.testing.assert_allclose(jnp.exp(new.param).sum(), 2.0, rtol=1e-6)
    np.testing.assert_allclose(new.param[1] - new.param[0], 1.0, rtol=1e-6)


def test_zero_initial_loss_gives_finite_weights() -> None:
    """Both originals divide by L(0) with no epsilon (NaN); the library uses 1 as the divisor."""
    for convention in GRADNORM_CONVENTIONS:
        tx = gradnorm(num_losses=2, layer="g", convention=convention)
        update = jax.jit(tx.update)
        state = tx.init(None)
        for loss in ([0.0, 1.0], [0.5, 0.8], [0.2, 0.7]):
            _, state = update({"g": jnp.array([[1.0, 0.0], [0.0, 2.0]])}, state, losses=jnp.array(loss))
        assert np.all(np.isfinite(state.weights)) and np.all(np.asarray(state.weights) > 0), convention


def test_gradnorm_init_dtype_follows_x64(x64: None) -> None:
    state = gradnorm_init(3, optax.sgd(0.1))
    assert state.param.dtype == jnp.float64 and state.weights.dtype == jnp.float64
    np.testing.assert_array_equal(gradnorm_init(2, optax.sgd(0.1), convention="physicsnemo").param, 0.0)


def test_value_errors_of_the_conventions() -> None:
    with pytest.raises(ValueError, match="`convention` must be one of"):
        gradnorm(num_losses=2, layer="a", convention="torch")
    with pytest.raises(ValueError, match=r"`min_weight` applies to convention='paper' only"):
        gradnorm(num_losses=2, layer="a", min_weight=1e-3)
    with pytest.raises(ValueError, match=r"`min_weight` must be < 1"):
        gradnorm(num_losses=2, layer="a", convention="paper", min_weight=1.0)
    with pytest.raises(ValueError, match=r"`initial_steps` applies to convention='libmtl' only"):
        gradnorm(num_losses=2, layer="a", convention="physicsnemo", initial_steps=2)
    with pytest.raises(ValueError, match="`initial_steps` must be an integer >= 1"):
        gradnorm(num_losses=2, layer="a", initial_steps=0)
    with pytest.raises(ValueError, match="`convention` must be one of"):
        gradnorm_init(2, optax.sgd(0.1), convention="LibMTL")
