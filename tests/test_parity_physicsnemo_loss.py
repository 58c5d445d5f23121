"""Parity with NVIDIA PhysicsNeMo-Sym 2.4.0's loss aggregators ``Sum``, ``SoftAdapt`` and ``Relobralo``.

``tests/data/physicsnemo_aggregators.json`` records ``physicsnemo/sym/loss/aggregator.py``
(PyPI sdist 2.4.0) in float64 over 50-step training runs of a small model and 60-step
scripted loss sequences: the losses passed in, the effective weight of each loss
(d aggregated / d L_k), the buffers, and the Bernoulli draws of ``Relobralo``.

Timing: PhysicsNeMo applies the weights computed from L(t) to the step-t loss (checked here:
``aggregated_loss = sum_k w_k(t) L_k(t)``); our ``update(L(t))`` returns those weights for
step t+1. The tests compare ``update(L(t))`` with the effective weights of step t.

Tolerance: float64 reference, same algorithm, so ``rtol=1e-6`` (the contract's; the
measured deviations are at rounding level).
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softadapt_jax.balancers.base import Balancer
from softadapt_jax.balancers.fixed import fixed_balancer
from softadapt_jax.balancers.ratio import ratio_softadapt_balancer
from softadapt_jax.balancers.relobralo import relobralo_balancer, relobralo_init_state, relobralo_step

DATA = json.loads((pathlib.Path(__file__).parent / "data" / "physicsnemo_aggregators.json").read_text())
METHODS = DATA["methods"]
RTOL = 1e-6


def cases(method: str) -> list[dict]:
    return METHODS[method]["cases"]


def keys(case: dict) -> list[str]:
    return case["inputs"]["loss_keys"]


def steps(case: dict, section: str, field: str) -> np.ndarray:
    """``field`` of every step: losses or weights by loss key ``[T, K]``, else ``[T, ...]``."""
    rows = [step[field] for step in case[section]["steps"]]
    if isinstance(rows[0], dict):
        rows = [[row[k] for k in keys(case)] for row in rows]
    return np.array(rows, np.float64)


def padded(arrays: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Stacks sequences of different lengths, repeating each one's last row (the runs are causal)."""
    n = max(len(a) for a in arrays)
    rows = [np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)]) for a in arrays]
    return np.stack(rows), [len(a) for a in arrays]


@functools.partial(jax.jit, static_argnums=0)
def run(b: Balancer, losses: jax.Array) -> jax.Array:
    """The weights after each ``update``, ``[C, T, K]``: a scan per sequence, vmapped over sequences."""

    def one(seq):
        def body(state, loss):
            w, state = b.update(loss, state)
            return state, w

        return jax.lax.scan(body, b.init(), seq)[1]

    return jax.vmap(one)(losses)


def check_against(method: str, weights: np.ndarray, lengths: list[int]) -> None:
    """Weights ``[C, T, K]`` against the effective weights, and the same-step aggregated losses."""
    for i, case in enumerate(cases(method)):
        want = steps(case, "expected", "effective_weights")
        np.testing.assert_allclose(weights[i, : lengths[i]], want, rtol=RTOL, err_msg=case["id"])
        # PhysicsNeMo's loss is the step's own weights times the step's losses.
        loss = np.sum(want * steps(case, "inputs", "losses"), axis=-1)
        np.testing.assert_allclose(loss, steps(case, "expected", "aggregated_loss"), rtol=1e-12)


# --------------------------------------------------------------------------- Sum


@pytest.mark.parametrize("case", cases("Sum"), ids=[c["id"] for c in cases("Sum")])
def test_sum_is_the_fixed_balancer(case, x64):
    """``Sum``: fixed_balancer's default (all ones); a user ``weights`` dict is its ``weights``."""
    user = case["inputs"]["kwargs"].get("weights")
    b = (
        fixed_balancer(num_losses=len(keys(case)))
        if user is None
        else fixed_balancer([user[k] for k in keys(case)], num_losses=len(keys(case)))
    )
    want = steps(case, "expected", "effective_weights")
    np.testing.assert_allclose(b.init().weights, want[0], rtol=RTOL)  # from the first step on
    ws = np.asarray(run(b, jnp.asarray(steps(case, "inputs", "losses"))[None]))[0]
    # The weights after step t are the weights of step t+1 (fixed ones: the same).
    np.testing.assert_allclose(ws, want, rtol=RTOL)
    loss = np.sum(want * steps(case, "inputs", "losses"), axis=-1)
    np.testing.assert_allclose(loss, steps(case, "expected", "aggregated_loss"), rtol=1e-12)


# --------------------------------------------------------------------------- SoftAdapt


def test_softadapt_is_ratio_softadapt_default(x64):
    losses, lengths = padded([steps(c, "inputs", "losses") for c in cases("SoftAdapt")])
    assert all(c["inputs"]["kwargs"] == {} for c in cases("SoftAdapt"))
    ws = np.asarray(run(ratio_softadapt_balancer(num_losses=losses.shape[-1]), jnp.asarray(losses)))
    check_against("SoftAdapt", ws, lengths)
    np.testing.assert_array_equal(ws[:, 0], 1.0)  # step 0: the plain sum


# --------------------------------------------------------------------------- Relobralo

RELOBRALO_DEFAULTS = METHODS["Relobralo"]["config"]["defaults"]


@jax.jit
def replay(losses, draws, alphas, taus):
    """:func:`relobralo_step` (convention "physicsnemo") over each sequence with its recorded draws."""

    def one(seq, rho, alpha, tau):
        def body(state, inputs):
            new = relobralo_step(state, *inputs, convention="physicsnemo", alpha=alpha, tau=tau)
            return new, new

        return jax.lax.scan(body, relobralo_init_state(seq.shape[-1], seq.dtype), (seq, rho))[1]

    return jax.vmap(one)(losses, draws, alphas, taus)


def test_relobralo_replays_the_recorded_draws(x64):
    relobralo = cases("Relobralo")
    losses, lengths = padded([steps(c, "inputs", "losses") for c in relobralo])
    # One draw per call; 2.4.0 also draws (and discards) one at step 0.
    draws, _ = padded([steps(c, "inputs", "bernoulli_draws")[:, 0] for c in relobralo])
    assert {0.0, 1.0} == set(np.unique(draws))
    hyper = [{**RELOBRALO_DEFAULTS, **c["inputs"]["kwargs"]} for c in relobralo]
    after = replay(
        jnp.asarray(losses),
        jnp.asarray(draws),
        jnp.array([h["alpha"] for h in hyper]),
        jnp.array([h["tau"] for h in hyper]),
    )
    check_against("Relobralo", np.asarray(after["lambdas"]), lengths)
    for i, case in enumerate(relobralo):
        buffers = [step["state_after_forward"] for step in case["expected"]["steps"]]
        n = lengths[i]
        np.testing.assert_allclose(after["lambdas"][i, :n], [b["lmbda_ema"] for b in buffers], rtol=RTOL)
        np.testing.assert_array_equal(after["prev"][i, :n], [b["prev_losses"] for b in buffers])
        np.testing.assert_array_equal(after["ref"][i, :n], [b["init_losses"] for b in buffers])


def test_relobralo_balancer_physicsnemo_convention(x64):
    """The balancer itself on the model-driven run, whose recorded draws are all 1 (``expected_rho=1``)."""
    case = next(c for c in cases("Relobralo") if c["id"] == "relobralo_default")
    assert np.all(steps(case, "inputs", "bernoulli_draws") == 1.0)
    b = relobralo_balancer(num_losses=len(keys(case)), convention="physicsnemo", expected_rho=1.0)
    ws = np.asarray(run(b, jnp.asarray(steps(case, "inputs", "losses"))[None]))[0]
    np.testing.assert_allclose(ws, steps(case, "expected", "effective_weights"), rtol=RTOL)


def test_relobralo_physicsnemo_first_call_only_records(x64):
    losses = jnp.array([0.5, 2.0, 0.01])
    step = jax.jit(functools.partial(relobralo_step, convention="physicsnemo"))
    for rho in (0.0, 1.0):  # the step-0 draw is discarded
        s = step(relobralo_init_state(3), losses, rho)
        np.testing.assert_array_equal(s["lambdas"], np.ones(3))
        np.testing.assert_array_equal(s["prev"], losses)
        np.testing.assert_array_equal(s["ref"], losses)


@pytest.mark.parametrize("method", ["ratio", "relobralo"])
def test_eps_also_in_the_softmax_sum(method, x64):
    """PhysicsNeMo's eps enters the ratios and the softmax's sum: K e / (sum e + eps).

    Invisible at the reference's eps (1e-8 relative), so checked with a large one.
    """
    eps, l0, l1 = 0.5, np.array([1.0, 4.0, 0.2]), np.array([0.8, 5.0, 0.1])
    r = l1 / (l0 + eps)
    e = np.exp(r - r.max())
    want = 3 * e / (e.sum() + eps)
    if method == "ratio":
        b = ratio_softadapt_balancer(num_losses=3, eps=eps)
    else:  # alpha = 0: the weights are the balance against the previous losses
        b = relobralo_balancer(num_losses=3, convention="physicsnemo", alpha=0.0, eps=eps)
    ws = np.asarray(run(b, jnp.asarray(np.stack([l0, l1]))[None]))[0]
    np.testing.assert_allclose(ws[1], want, rtol=1e-12)
    assert ws[1].sum() < 3.0
