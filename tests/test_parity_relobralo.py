"""Parity with the ReLoBRaLo authors' code: rbischof/relative_balancing at commit b3c76d2.

``tests/data/relobralo_bischof.json`` records ``src/update_rules.py`` ``relobralo`` and
``softadapt`` driven as ``src/train.py`` drives them (TensorFlow, float32) over scripted
loss sequences of 100 epochs, with the lookback draws ``rho_draws`` of each run.

Timing: the reference applies the weights computed from the epoch-t losses to that same
epoch; our ``update(L(t))`` returns the same weights, meant for step t+1. The tests compare
``update(L(t))`` (or :func:`relobralo_step` on ``L(t)``) with the reference's ``lam_after``
of epoch t, i.e. the recursion itself.

Tolerances. The reference ran in float32. Replayed in float32, our recursion performs the same
operations in the same precision, so it is held to 4 float32 ulps (last-bit differences between
XLA's and TensorFlow's exp and softmax kernels). Replayed in float64, it differs from the
float32 reference by that reference's own rounding, accumulated over up to 100 recursive steps
of weights of order 1 (float32 ulp of 2: 2.4e-7): absolute tolerance 4e-6. An absolute, not a
relative, tolerance, because with T=1e-5 the weights are nearly one-hot and their tiny entries
(exp of minus about 1e5) carry the float32 rounding of ratios of about 1e5 in relative terms.
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
from softadapt_jax.balancers.ratio import ratio_softadapt_balancer
from softadapt_jax.balancers.relobralo import relobralo_balancer, relobralo_init_state, relobralo_step

DATA = json.loads((pathlib.Path(__file__).parent / "data" / "relobralo_bischof.json").read_text())
RELOBRALO = DATA["methods"]["relobralo"]["cases"]
SOFTADAPT = DATA["methods"]["softadapt"]["cases"]
K = DATA["methods"]["relobralo"]["config"]["K"]
F64_ATOL = 4e-6
F32_MAXULP = 4


def per_epoch(case: dict, section: str, field: str) -> np.ndarray:
    return np.array([row[field] for row in case[section]["per_epoch"]], np.float64)


def stacked(field: str, section: str = "expected") -> np.ndarray:
    """``field`` of every ReLoBRaLo case, ``[C, T, ...]``."""
    return np.stack([per_epoch(c, section, field) for c in RELOBRALO])


LOSSES = np.stack([np.array(c["inputs"]["loss_sequence"]) for c in RELOBRALO])  # [C, T, K]
# rho_draws has epochs + 1 entries; epoch t uses entry t.
RHOS = np.stack([np.array(c["inputs"]["rho_draws"][: LOSSES.shape[1]]) for c in RELOBRALO])
ALPHAS = np.array([c["inputs"]["alpha"] for c in RELOBRALO])
TAUS = np.array([c["inputs"]["T"] for c in RELOBRALO])


@functools.partial(jax.jit, static_argnames="convention")
def replay(losses, rhos, alphas, taus, convention="bischof"):
    """:func:`relobralo_step` scanned over each sequence with its recorded draws, vmapped over cases.

    Returns the state before each call and the weights after it, ``[C, T, ...]``.
    """

    def one(seq, rho, alpha, tau):
        def body(state, inputs):
            new = relobralo_step(state, *inputs, convention=convention, alpha=alpha, tau=tau)
            return new, (state, new["lambdas"])

        return jax.lax.scan(body, relobralo_init_state(seq.shape[-1], seq.dtype), (seq, rho))[1]

    return jax.vmap(one)(losses, rhos, alphas, taus)


@functools.partial(jax.jit, static_argnums=0)
def weights_after_each(b: Balancer, losses: jax.Array) -> jax.Array:
    """The balancer's weights after each ``update`` of a ``[T, K]`` sequence."""

    def body(state, loss):
        w, state = b.update(loss, state)
        return state, w

    return jax.lax.scan(body, b.init(), losses)[1]


def test_recorded_schedule_is_the_documented_one():
    """The recorded inputs follow the schedule the implementation assumes (train.py's)."""
    np.testing.assert_array_equal(stacked("rho_used", "inputs"), RHOS)
    alpha_used = stacked("alpha_used", "inputs")
    np.testing.assert_allclose(alpha_used[:, 0], 1.0)
    np.testing.assert_allclose(alpha_used[:, 1], 0.0)
    later = np.repeat(ALPHAS[:, None], alpha_used.shape[1] - 2, axis=1)
    np.testing.assert_allclose(alpha_used[:, 2:], later, rtol=1e-7)
    # The reference applies lambda(t) to the epoch-t losses (the one-step timing difference).
    np.testing.assert_allclose(
        np.sum(stacked("lam_after") * LOSSES, axis=-1), stacked("weighted_loss_sum_lam_L"), rtol=1e-5
    )


def test_relobralo_recursion_float64(x64):
    before, lam = replay(LOSSES, RHOS, ALPHAS, TAUS)
    np.testing.assert_allclose(lam, stacked("lam_after"), rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(before["lambdas"], stacked("lam_before"), rtol=0, atol=F64_ATOL)
    # prev and the lookback reference are the losses themselves (or the placeholder 1.0): exact.
    np.testing.assert_array_equal(before["prev"], stacked("l_prev"))
    np.testing.assert_array_equal(before["ref"], stacked("l0"))


def test_relobralo_recursion_float32():
    losses, rhos, alphas, taus = (np.asarray(a, np.float32) for a in (LOSSES, RHOS, ALPHAS, TAUS))
    _, lam = replay(losses, rhos, alphas, taus)
    assert lam.dtype == jnp.float32
    want = stacked("lam_after").astype(np.float32)
    np.testing.assert_array_max_ulp(np.asarray(lam), want, maxulp=F32_MAXULP)


# The cases whose recorded draws are all 1 can be run through the balancer itself with
# expected_rho=1 (draws that are always 1): the default configuration, and T=1e-5.
ALL_ONES = [c["id"] for c in RELOBRALO if all(c["inputs"]["rho_draws"][:100])]


@pytest.mark.parametrize("case_id", [ALL_ONES[0], ALL_ONES[-1]])
def test_relobralo_balancer_reproduces_the_authors_run(case_id, x64):
    case = next(c for c in RELOBRALO if c["id"] == case_id)
    inputs = case["inputs"]
    if case_id == RELOBRALO[0]["id"]:  # train.py's defaults are the factory's defaults
        assert (inputs["alpha"], inputs["T"], inputs["rho"]) == (0.999, 1.0, 1.0)
        b = relobralo_balancer(num_losses=K)
    else:
        b = relobralo_balancer(num_losses=K, alpha=inputs["alpha"], tau=inputs["T"], expected_rho=1.0)
    ws = weights_after_each(b, jnp.asarray(inputs["loss_sequence"]))
    assert ws.dtype == jnp.float64
    np.testing.assert_allclose(ws, per_epoch(case, "expected", "lam_after"), rtol=0, atol=F64_ATOL)


def test_relobralo_first_calls(x64):
    """Calls 0 and 1 of the authors' schedule, written out (alpha_0 = 1, alpha_1 = 0, placeholders 1.0)."""
    l0, l1, l2 = jnp.array([1.0, 10.0, 0.01]), jnp.array([2.0, 5.0, 0.03]), jnp.array([1.5, 6.0, 0.02])
    tau, eps = 0.5, 1e-12

    def bal(cur, ref):
        return K * jax.nn.softmax(cur / (tau * ref + eps))

    step = jax.jit(functools.partial(relobralo_step, alpha=0.9, tau=tau))
    s0 = relobralo_init_state(K)
    keep = step(s0, l0, 1.0)
    look = step(s0, l0, 0.0)
    np.testing.assert_array_equal(keep["lambdas"], np.ones(K))
    np.testing.assert_allclose(look["lambdas"], bal(l0, jnp.ones(K)), rtol=1e-12)
    np.testing.assert_array_equal(keep["ref"], np.ones(K))  # still the placeholder
    for rho in (0.0, 1.0):  # alpha_1 = 0: only the balance against L(0) counts
        s1 = step(look, l1, rho)
        np.testing.assert_allclose(s1["lambdas"], bal(l1, l0), rtol=1e-12)
        np.testing.assert_array_equal(s1["ref"], l1)  # the lookback reference is epoch 1's losses
    s2 = step(s1, l2, 1.0)  # from call 2 on: the configured alpha
    np.testing.assert_allclose(s2["lambdas"], 0.9 * s1["lambdas"] + 0.1 * bal(l2, l1), rtol=1e-12)
    np.testing.assert_array_equal(s2["calls"], 2)
    s3 = step(s2, l0, 0.0)  # rho = 0: looks back to ref = L(1)
    np.testing.assert_allclose(s3["lambdas"], 0.9 * bal(l0, l1) + 0.1 * bal(l0, l2), rtol=1e-12)
    np.testing.assert_array_equal(s3["ref"], l1)


# --------------------------------------------------------------------------- the authors' softadapt


@pytest.mark.parametrize("case", SOFTADAPT, ids=[c["id"] for c in SOFTADAPT])
@pytest.mark.parametrize("enable_x64", [False, True], ids=["float32", "float64"])
def test_difference_softadapt_reproduces_the_authors_run(case, enable_x64):
    """train.py fixes the authors' moving average at 0, so the weights are K * softmax(T * (L(t) - L(t-1))).

    Not recursive: float32 and float64 both stay within rtol 1e-6 of the float32 reference
    (a few float32 ulps; the inputs are float32 values, exact in both precisions).
    """
    assert all(row["alpha_used"] == 0.0 for row in case["inputs"]["per_epoch"])
    with jax.enable_x64(enable_x64):
        b = ratio_softadapt_balancer(num_losses=K, form="difference", beta=case["inputs"]["T"])
        ws = weights_after_each(b, jnp.asarray(case["inputs"]["loss_sequence"]))
        assert ws.dtype == (jnp.float64 if enable_x64 else jnp.float32)
    np.testing.assert_allclose(ws, per_epoch(case, "expected", "lam_after"), rtol=1e-6)
    # The first weights compare L(0) with the authors' placeholder 1.0.
    lam_before = per_epoch(case, "expected", "lam_before")
    np.testing.assert_allclose(lam_before[1:], per_epoch(case, "expected", "lam_after")[:-1], rtol=1e-7)


# --------------------------------------------------------------------------- groups and errors

GROUPED_LOSSES = np.array(
    [[1.0, 2.0, 0.5, 4.0], [0.8, 2.5, 0.4, 3.0], [0.9, 1.0, 0.45, 3.5], [0.7, 1.2, 0.3, 2.0]]
)
GROUPS = (0, 1, 0, 1)


@pytest.mark.parametrize(
    "factory,kwargs",
    [
        (relobralo_balancer, {"expected_rho": 0.5, "seed": 4}),
        (relobralo_balancer, {"convention": "physicsnemo", "expected_rho": 0.5, "seed": 4}),
        (ratio_softadapt_balancer, {}),
        (ratio_softadapt_balancer, {"form": "difference", "beta": 0.5}),
    ],
    ids=["relobralo", "relobralo-physicsnemo", "ratio", "difference"],
)
def test_groups_weigh_the_summed_losses(factory, kwargs, x64):
    """A group's terms share the weight the ungrouped method gives to their summed loss."""
    grouped = factory(num_losses=4, groups=GROUPS, **kwargs)
    plain = factory(num_losses=2, **kwargs)
    summed = GROUPED_LOSSES[:, [0, 2]].sum(axis=1), GROUPED_LOSSES[:, [1, 3]].sum(axis=1)
    summed = np.stack(summed, axis=1)
    assert grouped.weights_sum == 2.0 and grouped.groups == GROUPS
    w_grouped = weights_after_each(grouped, jnp.asarray(GROUPED_LOSSES))
    w_plain = weights_after_each(plain, jnp.asarray(summed))
    np.testing.assert_allclose(w_grouped, w_plain[:, list(GROUPS)], rtol=1e-12)
    assert not np.allclose(w_plain, 1.0)


@pytest.mark.parametrize(
    "factory,kwargs,match",
    [
        (
            relobralo_balancer,
            {"convention": "modulus"},
            r"`convention` must be one of \['bischof', 'physicsnemo'\], got 'modulus'",
        ),
        (
            ratio_softadapt_balancer,
            {"form": "slope"},
            r"`form` must be one of \['difference', 'ratio'\], got 'slope'",
        ),
        (ratio_softadapt_balancer, {"beta": float("inf")}, r"`beta` must be a finite number.*got inf"),
        (relobralo_balancer, {"groups": (0, 2, 2)}, r"`groups` must use each of the ids 0..G-1"),
        (ratio_softadapt_balancer, {"groups": (0, 1)}, r"`groups` must give one group id per loss term"),
    ],
)
def test_errors_name_the_argument(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(num_losses=3, **kwargs)
