"""Parity with PhysicsNeMo-Sym's ``HomoscedasticUncertainty`` (2.4.0): ``convention="physicsnemo"``.

The reference (``tests/data/physicsnemo_aggregators.json``, README §3) trained a
small PINN for 50 steps with the aggregator's ``log_var`` in the trainer's
Adam (lr 1e-2). Its loss is ``(sum_k exp(-s_k) L_k + sum_k s_k) / 2``, with
``s`` starting at 0, and the ``s`` after step t-1's optimizer step weighs step
t's losses. We replay the recorded losses through one jitted ``lax.scan``:
the weights used at step t are those of the state before ``update(L(t))``.

Tolerance: ``rtol=1e-6`` (the same algorithm in float64; optax's Adam and
torch's differ only in rounding) with ``atol=1e-12`` for the log-variances
and gradients, which pass near 0.
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

from softadapt_jax.balancers.base import Balancer
from softadapt_jax.balancers.uncertainty import (
    UNCERTAINTY_FORMS,
    uncertainty_balancer,
    uncertainty_log_var_grad,
)

DATA = pathlib.Path(__file__).parent / "data" / "physicsnemo_aggregators.json"
TOL = {"rtol": 1e-6, "atol": 1e-12}


@functools.cache
def _cases() -> list[dict[str, Any]]:
    return json.loads(DATA.read_text())["methods"]["HomoscedasticUncertainty"]["cases"]


@functools.partial(jax.jit, static_argnums=0)
def replay(balancer: Balancer, losses: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The weights used at each step, and the log-variances before and after its update."""

    def body(state: Any, loss: jax.Array) -> tuple[Any, tuple[jax.Array, jax.Array, jax.Array]]:
        _, new = balancer.update(loss, state)
        return new, (state.weights, state.method_state["log_vars"], new.method_state["log_vars"])

    _, out = jax.lax.scan(body, balancer.init(), losses)
    return out


def test_physicsnemo_convention_reproduces_homoscedastic_uncertainty(x64):
    _, b_coef = UNCERTAINTY_FORMS["regression"]
    for case in _cases():
        assert case["inputs"]["kwargs"] == {}
        keys = case["inputs"]["loss_keys"]
        ins, outs = case["inputs"]["steps"], case["expected"]["steps"]
        losses = np.array([[s["losses"][k] for k in keys] for s in ins])
        b = uncertainty_balancer(num_losses=len(keys), convention="physicsnemo")
        used, s_before, s_after = replay(b, jnp.asarray(losses))

        np.testing.assert_allclose(used, [[s["effective_weights"][k] for k in keys] for s in outs], **TOL)
        np.testing.assert_allclose(s_before, [s["state_before"]["log_var"] for s in ins], **TOL)
        np.testing.assert_allclose(
            uncertainty_log_var_grad(s_before, jnp.asarray(losses)),
            [s["aggregator_param_grads"]["log_var"] for s in outs],
            **TOL,
        )
        np.testing.assert_allclose(s_after, [s["state_after_optimizer_step"]["log_var"] for s in outs], **TOL)
        remainder = b_coef * np.sum(s_before, axis=1)
        np.testing.assert_allclose(remainder, [s["remainder"] for s in outs], **TOL)
        np.testing.assert_allclose(
            np.sum(used * losses, axis=1) + remainder, [s["aggregated_loss"] for s in outs], **TOL
        )


def test_physicsnemo_convention_differs_from_the_default_only_in_its_start_and_optimizer(x64):
    """Same form as LibMTL's UW; s0 = 0 (weights 1/2) and Adam(1e-2) instead of -0.5 and SGD(0.1)."""
    nemo = uncertainty_balancer(num_losses=3, convention="physicsnemo")
    libmtl = uncertainty_balancer(num_losses=3)
    np.testing.assert_array_equal(nemo.init().weights, 0.5)
    np.testing.assert_allclose(libmtl.init().weights, 0.5 * np.exp(0.5), rtol=1e-12)
    assert nemo.name == libmtl.name == "uncertainty_regression"
    assert nemo.weights_sum == 1.5
    losses = jnp.asarray(np.array([[0.3, 2.0, 0.01]] * 3))
    same = uncertainty_balancer(num_losses=3, init_log_var=0.0, optimizer=optax.adam(1e-2))
    np.testing.assert_array_equal(replay(same, losses)[0], replay(nemo, losses)[0])
