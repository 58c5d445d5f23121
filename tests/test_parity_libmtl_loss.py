"""Parity with LibMTL's loss-level weightings EW, UW, DWA and RLW (git 4336804).

The reference (``tests/data/libmtl_weightings.json``, README §2) ran each LibMTL
class for 20 steps (K=3 and K=4, one batch per epoch) with identity gradients,
so ``combined_grad`` is the coefficient each step's loss received. Our
balancers return the weights for the *next* step, so the weights used at step
t are those of the state before ``update(L(t))``; each sequence is replayed
with one jitted ``lax.scan``. The tests also check the groups option of the
factories of this family, and their new error messages.

Tolerance: ``rtol=1e-6`` (the contract for the same algorithm in float64) with
``atol=1e-12`` for the log-variances and their gradients, which pass near 0.
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

from softadapt_jax.balancers.base import Balancer
from softadapt_jax.balancers.dwa import dwa_balancer
from softadapt_jax.balancers.fixed import fixed_balancer
from softadapt_jax.balancers.rlw import rlw_balancer, rlw_draw, rlw_weights
from softadapt_jax.balancers.softadapt import softadapt_balancer
from softadapt_jax.balancers.uncertainty import (
    UNCERTAINTY_FORMS,
    uncertainty_balancer,
    uncertainty_log_var_grad,
)

DATA = pathlib.Path(__file__).parent / "data" / "libmtl_weightings.json"
TOL = {"rtol": 1e-6, "atol": 1e-12}


@functools.cache
def _methods() -> dict[str, Any]:
    return json.loads(DATA.read_text())["methods"]


def sequences(method: str) -> list[dict[str, Any]]:
    """The recorded sequence cases of ``method`` (all of them: held-out files may add more)."""
    return [c for c in _methods()[method]["cases"] if "per_step" in c["inputs"]]


def steps(case: dict[str, Any], field: str, where: str = "expected") -> np.ndarray:
    """One per-step field of a case, stacked over the steps."""
    return np.array([s[field] for s in case[where]["per_step"]], dtype=np.float64)


@functools.partial(jax.jit, static_argnums=0)
def replay(balancer: Balancer, losses: jax.Array) -> tuple[jax.Array, Any, Any]:
    """The weights used at each step (before its update), and the states before and after it."""

    def body(state: Any, loss: jax.Array) -> tuple[Any, tuple[jax.Array, Any, Any]]:
        _, new = balancer.update(loss, state)
        return new, (state.weights, state, new)

    _, out = jax.lax.scan(body, balancer.init(), losses)
    return out


def check_epoch_buffer(case: dict[str, Any], after: Any) -> None:
    """At each epoch's last step our newest history entry is the Trainer's epoch-average loss."""
    n = case["inputs"]["steps_per_epoch"]
    ends = np.arange(n - 1, len(case["inputs"]["per_step"]), n)
    want = steps(case, "train_loss_buffer_col_after_epoch")[ends]
    np.testing.assert_allclose(np.asarray(after.history)[ends, -1], want, **TOL)


def check_coefficients(case: dict[str, Any], used: jax.Array) -> np.ndarray:
    """Checks our weights against LibMTL's coefficients and returned weights; returns the losses."""
    losses = steps(case, "losses", "inputs")
    np.testing.assert_allclose(used, steps(case, "combined_grad"), **TOL)
    np.testing.assert_allclose(used, steps(case, "returned_weights"), **TOL)
    return losses


# --------------------------------------------------------------------------- EW


def test_ew_is_the_default_fixed_balancer(x64):
    """EW sums the losses (coefficient 1, not the 1/T of its docstring): our default."""
    for case in sequences("EW"):
        losses = steps(case, "losses", "inputs")
        b = fixed_balancer(num_losses=case["inputs"]["K"], accumulate=case["inputs"]["steps_per_epoch"])
        used, _, after = replay(b, jnp.asarray(losses))
        check_coefficients(case, used)
        np.testing.assert_allclose(np.sum(used * losses, axis=1), steps(case, "last_backward_scalar"), **TOL)
        check_epoch_buffer(case, after)


# --------------------------------------------------------------------------- DWA


def dwa_for(case: dict[str, Any], **kwargs: Any) -> Balancer:
    return dwa_balancer(_methods()["DWA"]["constructor_args"]["T"], num_losses=case["inputs"]["K"], **kwargs)


def test_dwa_default_reproduces_libmtl(x64):
    """Epoch e's weights come from the epoch losses of e-1 and e-2; ones in epochs 0 and 1.

    LibMTL's epochs are ``accumulate=steps_per_epoch`` (1 in the recorded cases)."""
    for case in sequences("DWA"):
        n = case["inputs"]["steps_per_epoch"]
        losses = steps(case, "losses", "inputs")
        used, _, after = replay(dwa_for(case, accumulate=n), jnp.asarray(losses))
        check_coefficients(case, used)
        np.testing.assert_array_equal(used[: 2 * n], 1.0)
        np.testing.assert_allclose(np.sum(used * losses, axis=1), steps(case, "last_backward_scalar"), **TOL)
        check_epoch_buffer(case, after)


def test_dwa_accumulate_maps_libmtl_epochs(x64):
    """``accumulate=n``: n steps per epoch whose mean is LibMTL's epoch loss give its weights,
    held through each epoch."""
    n = 3
    spread = np.array([1.2, 1.0, 0.8])[:, None]  # batch losses around the epoch mean
    for case in [c for c in sequences("DWA") if c["inputs"]["steps_per_epoch"] == 1]:
        epoch_losses = steps(case, "losses", "inputs")
        batches = (epoch_losses[:, None, :] * spread).reshape(-1, epoch_losses.shape[1])
        used, _, _ = replay(dwa_for(case, accumulate=n), jnp.asarray(batches))
        want = np.repeat(steps(case, "combined_grad"), n, axis=0)
        np.testing.assert_allclose(used, want, **TOL)


# --------------------------------------------------------------------------- RLW


def test_rlw_rule_reproduces_libmtl_on_the_recorded_draws(x64):
    """softmax(z) of each recorded torch.randn draw: LibMTL's coefficients (summing to 1)."""
    for case in sequences("RLW"):
        draws = []
        for step in case["expected"]["per_step"]:
            (draw,) = step["draws"]
            assert draw["fn"] == "torch.randn"
            draws.append(draw["value"])
        weights = jax.jit(jax.vmap(rlw_weights))(jnp.asarray(draws))
        losses = check_coefficients(case, weights)
        np.testing.assert_allclose(np.sum(weights, axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(
            np.sum(weights * losses, axis=1), steps(case, "last_backward_scalar"), **TOL
        )


@pytest.mark.parametrize("sum_to_k", [False, True])
def test_rlw_balancer_applies_the_rule_to_one_draw_per_step(x64, sum_to_k):
    """From step 0 on, the weights used at step t are rlw_weights of the t-th draw of the key chain."""
    k, seed, steps_ = 4, 11, 6
    b = rlw_balancer(num_losses=k, seed=seed, sum_to_k=sum_to_k)
    used, _, after = replay(b, jnp.ones((steps_, k)))

    def next_draw(key: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
        key, sub = jax.random.split(key)
        return key, rlw_draw(sub, k)

    key, draws = jax.lax.scan(next_draw, jax.random.PRNGKey(seed), None, length=steps_ + 1)
    want = jax.vmap(functools.partial(rlw_weights, sum_to_k=sum_to_k))(draws)
    np.testing.assert_array_equal(used, want[:-1])
    np.testing.assert_array_equal(after.weights[-1], want[-1])
    np.testing.assert_array_equal(after.method_state["key"][-1], key)
    assert b.weights_sum == (k if sum_to_k else 1.0)


# --------------------------------------------------------------------------- UW


def test_uw_default_reproduces_libmtl(x64):
    """s0 = -0.5, weights 1/(2 exp(s)), SGD(0.1) on s after every step, as the recorded harness."""
    _, b_coef = UNCERTAINTY_FORMS["regression"]
    for case in sequences("UW"):
        losses = steps(case, "losses", "inputs")
        b = uncertainty_balancer(num_losses=case["inputs"]["K"])
        used, before, after = replay(b, jnp.asarray(losses))
        check_coefficients(case, used)
        s_before, s_after = before.method_state["log_vars"], after.method_state["log_vars"]
        # The loss scale that multiplies step t's losses is the one before that step's SGD step.
        np.testing.assert_allclose(s_before, steps(case, "loss_scale_before", "inputs"), **TOL)
        np.testing.assert_allclose(
            uncertainty_log_var_grad(s_before, jnp.asarray(losses)), steps(case, "loss_scale.grad"), **TOL
        )
        np.testing.assert_allclose(s_after, steps(case, "loss_scale_after_sgd"), **TOL)
        total = np.sum(used * losses, axis=1) + b_coef * np.sum(s_before, axis=1)
        np.testing.assert_allclose(total, steps(case, "last_backward_scalar"), **TOL)


def test_uw_libmtl_trainer_optimizer_is_an_option(x64):
    """LibMTL's Trainer would step s with its global Adam (lr 1e-4): one explicit argument."""
    b = uncertainty_balancer(num_losses=3, optimizer=optax.adam(1e-4))
    used, before, after = replay(b, jnp.array([[1.0, 2.0, 4.0]] * 2))
    np.testing.assert_allclose(used[0], 0.5 * np.exp(0.5), rtol=1e-12)
    # Adam's first step moves every s by lr against the sign of its gradient (0.5 - 0.5 e^0.5 L < 0).
    np.testing.assert_allclose(after.method_state["log_vars"][0], -0.5 + 1e-4, rtol=1e-6)


# --------------------------------------------------------------------------- groups

FAMILY = {
    "fixed": lambda **kw: fixed_balancer(**kw),
    "dwa": lambda **kw: dwa_balancer(**kw),
    "rlw": lambda **kw: rlw_balancer(seed=3, **kw),
    "uncertainty": lambda **kw: uncertainty_balancer(**kw),
    "softadapt": lambda **kw: softadapt_balancer(window=3, **kw),
}
GROUPS = (0, 1, 0, 2)
_rng = np.random.default_rng(5)
GROUP_LOSSES = np.exp(_rng.normal(size=(8, 4)) - 0.1 * np.arange(8)[:, None])


@pytest.mark.parametrize("name", list(FAMILY))
def test_groups_share_the_weight_of_the_summed_group_loss(x64, name):
    """Grouped terms get their group's weight, the one the ungrouped method gives the group sums."""
    grouped = FAMILY[name](num_losses=4, groups=GROUPS)
    plain = FAMILY[name](num_losses=3)
    assert grouped.groups == GROUPS and grouped.weights_sum == pytest.approx(plain.weights_sum)
    sums = np.stack([GROUP_LOSSES[:, [0, 2]].sum(1), GROUP_LOSSES[:, 1], GROUP_LOSSES[:, 3]], axis=1)
    used_g, _, after_g = replay(grouped, jnp.asarray(GROUP_LOSSES))
    used_p, _, after_p = replay(plain, jnp.asarray(sums))
    np.testing.assert_allclose(used_g, used_p[:, list(GROUPS)], rtol=1e-12)
    np.testing.assert_allclose(after_g.history, after_p.history, rtol=1e-12)
    if name != "fixed":
        assert not np.allclose(used_g[-1], used_g[0])  # the weights did adapt


def test_fixed_weights_are_one_per_group(x64):
    b = fixed_balancer([2.0, 0.5, 1.0], num_losses=4, groups=GROUPS, setpoint=[1.0, 1.0, 3.0, 1.0])
    np.testing.assert_array_equal(b.init().weights, [2.0, 0.5, 6.0, 1.0])
    assert b.weights_sum == 3.5


# --------------------------------------------------------------------------- errors

ERRORS = [
    (
        lambda: fixed_balancer([1.0, 2.0, 3.0, 4.0], num_losses=4, groups=GROUPS),
        ValueError,
        r"`weights` must have shape \(3,\) to match the 3 groups of `groups`, got \(4,\)",
    ),
    (lambda: rlw_balancer(num_losses=3, sum_to_k=1), TypeError, r"`sum_to_k` must be a bool, got 1"),
    (
        lambda: rlw_weights(jnp.ones((2, 3))),
        ValueError,
        r"`draw` must be a non-empty vector \[G\], got shape \(2, 3\)",
    ),
    (
        lambda: rlw_weights(jnp.ones(3), distribution="beta"),
        ValueError,
        r"`distribution` must be one of .*got 'beta'",
    ),
    (
        lambda: uncertainty_balancer(num_losses=3, convention="kendall"),
        ValueError,
        r"`convention` must be one of \['libmtl', 'physicsnemo'\], got 'kendall'",
    ),
    (
        lambda: uncertainty_balancer(num_losses=3, init_log_var=100.0),
        ValueError,
        r"`init_log_var` must be a finite number in \[-44.*, 44.*\], got 100.0",
    ),
    (
        lambda: uncertainty_balancer(num_losses=3, init_log_var=float("nan")),
        ValueError,
        r"`init_log_var` must be a finite number",
    ),
    (
        lambda: dwa_balancer(num_losses=3, groups=(0, 1)),
        ValueError,
        r"`groups` must give one group id per loss",
    ),
    (
        lambda: uncertainty_balancer(num_losses=3, groups=(0, 2, 2)),
        ValueError,
        r"`groups` must use each of the ids",
    ),
]


@pytest.mark.parametrize("build,exc,match", ERRORS)
def test_errors(build, exc, match):
    with pytest.raises(exc, match=match):
        build()
