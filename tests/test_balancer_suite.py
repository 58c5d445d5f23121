"""One contract every balancer must meet, parametrized over all of them.

Each case is built once per module and every test of a case feeds it loss
streams of the same shape, so it is compiled a handful of times only. The
gradient-statistics balancers (learning-rate annealing, inverse gradient norm,
NTK) are fed a synthetic statistic made from the losses, so they run through
the same contract as the loss-statistics ones; the Jacobian aggregators have
theirs in ``test_contract_aggregators.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softadapt_jax.balancers.base import Balancer, BalancerState
from softadapt_jax.balancers.dwa import dwa_balancer
from softadapt_jax.balancers.fixed import fixed_balancer
from softadapt_jax.balancers.gradient_weighting import (
    inverse_grad_norm_balancer,
    lr_annealing_balancer,
    ntk_balancer,
)
from softadapt_jax.balancers.ratio import ratio_softadapt_balancer
from softadapt_jax.balancers.relobralo import relobralo_balancer
from softadapt_jax.balancers.rlw import rlw_balancer
from softadapt_jax.balancers.softadapt import softadapt_balancer
from softadapt_jax.balancers.uncertainty import uncertainty_balancer
from softadapt_jax.statistics import statistic_shape
from softadapt_jax.transform import balance, find_balancer_states, get_weights, value_and_weighted_grad

K = 3
STEPS = 20
SETPOINT = np.array([2.0, 0.5, 1.5])
_rng = np.random.default_rng(7)
STREAM = (
    np.array([1.0, 20.0, 0.05])
    * np.exp(-0.1 * np.arange(STEPS)[:, None] * np.array([1.0, 0.2, 3.0]))
    * np.exp(0.1 * _rng.normal(size=(STEPS, K)))
).astype(np.float32)
STREAM_2 = (np.sqrt(STREAM[::-1]) * 3.0).astype(np.float32)


def synthetic_statistic(b: Balancer) -> Balancer:
    """``b`` with its gradient statistic made from the losses: a loss-statistics balancer for the suite.

    The statistic has the kind's shape, is positive where the losses are, and non-finite
    where they are (as a real one would be on a non-finite step).
    """
    rows = b.num_losses if b.groups is None else max(b.groups) + 1

    def update(losses: Any, state: BalancerState, statistics: Any = None) -> tuple[jax.Array, BalancerState]:
        del statistics
        base = jnp.sqrt(jnp.abs(jnp.asarray(losses, jnp.float32)))[:rows] + 0.5
        shape = statistic_shape(b.statistic, rows)
        stats = base if len(shape) == 1 else jnp.stack([3.0 * base, base], axis=1)  # grad_abs: [max, mean]
        return b.update(losses, state, stats)

    return b._replace(update=update, statistic=None)


@dataclasses.dataclass(frozen=True)
class Case:
    """A balancer configuration and what the suite may assume about it."""

    id: str
    build: Callable[[], Balancer]
    window: int
    setpoint: np.ndarray | None = None
    constant_sum: bool = True  # the weights always sum to ``weights_sum`` (times the set-point)


# Every method, SoftAdapt in each variant, and option combinations (set-point,
# update_every, accumulate, averaging, non-default weights).
CASES = [
    Case("fixed", lambda: fixed_balancer(num_losses=K), 1),
    Case(
        "fixed_weights_setpoint",
        lambda: fixed_balancer([1.0, 3.0, 0.5], num_losses=K, setpoint=SETPOINT),
        1,
        SETPOINT,
    ),
    Case("softadapt_original", lambda: softadapt_balancer(num_losses=K, variant="original"), 5),
    Case("softadapt_normalized", lambda: softadapt_balancer(num_losses=K, variant="normalized"), 5),
    Case(
        "softadapt_loss_weighted_sum_to_k_setpoint",
        lambda: softadapt_balancer(
            num_losses=K, variant="loss_weighted", window=3, sum_to_k=True, setpoint=SETPOINT
        ),
        3,
        SETPOINT,
    ),
    Case("ratio_softadapt", lambda: ratio_softadapt_balancer(num_losses=K), 2),
    Case(
        "relobralo_setpoint_every2",
        lambda: relobralo_balancer(num_losses=K, expected_rho=0.5, setpoint=SETPOINT, update_every=2),
        1,
        SETPOINT,
    ),
    Case("dwa_average2_accumulate2", lambda: dwa_balancer(num_losses=K, average_over=2, accumulate=2), 4),
    Case("uncertainty", lambda: uncertainty_balancer(num_losses=K), 1, constant_sum=False),
    Case("rlw", lambda: rlw_balancer(num_losses=K), 1),
    Case(
        "lr_annealing_every3",
        lambda: synthetic_statistic(lr_annealing_balancer(num_losses=K, update_every=3)),
        1,
        constant_sum=False,
    ),
    Case(
        "lr_annealing_physicsnemo_setpoint",
        lambda: synthetic_statistic(
            lr_annealing_balancer(num_losses=K, convention="physicsnemo", update_every=2, setpoint=SETPOINT)
        ),
        1,
        SETPOINT,
        constant_sum=False,
    ),
    Case(
        "inverse_grad_norm_every2",
        lambda: synthetic_statistic(inverse_grad_norm_balancer(num_losses=K, update_every=2)),
        1,
        constant_sum=False,
    ),
    Case(
        "ntk_every4",
        lambda: synthetic_statistic(ntk_balancer(num_losses=K, update_every=4)),
        1,
        constant_sum=False,
    ),
]
CASE_BY_ID = {c.id: c for c in CASES}
IDS = [c.id for c in CASES]


@functools.cache
def balancer(case_id: str) -> Balancer:
    return CASE_BY_ID[case_id].build()


@functools.partial(jax.jit, static_argnums=0)
def _run(b: Balancer, states: BalancerState, losses: jax.Array) -> tuple[jax.Array, BalancerState]:
    def one(state: BalancerState, stream: jax.Array) -> tuple[jax.Array, BalancerState]:
        def body(s: BalancerState, loss: jax.Array) -> tuple[BalancerState, tuple[jax.Array, BalancerState]]:
            w, s = b.update(loss, s)
            return s, (w, s)

        _, (ws, states) = jax.lax.scan(body, state, stream)
        return ws, states

    return jax.vmap(one)(states, losses)


def run(b: Balancer, pairs: list[tuple[Any, np.ndarray]]) -> tuple[np.ndarray, BalancerState]:
    """Two independent ``(initial state, [T, K] losses)`` runs, vmapped, jitted and scanned.

    Returns the weights ``[2, T, K]`` and the states (NumPy, stacked ``[2, T, ...]``)
    after each step. Every test uses this one shape, so each case is compiled once
    (plus once for the optax training).
    """
    states = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[p[0] for p in pairs])
    ws, out = _run(b, states, np.stack([p[1] for p in pairs]).astype(np.float32))
    return np.asarray(ws), jax.tree.map(np.asarray, out)


def at(states: Any, *index: int) -> Any:
    return jax.tree.map(lambda x: x[index], states)


def eager(b: Balancer, state: Any, losses: np.ndarray) -> tuple[list[jax.Array], Any]:
    """Op-by-op updates (``jax.disable_jit``): the weights after each step, and the final state."""
    ws = []
    with jax.disable_jit():
        for loss in losses:
            w, state = b.update(loss, state)
            ws.append(w)
    return ws, state


def assert_trees_close(a: Any, b: Any, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal_dtypes(a, b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def scale(case: Case, w: Any) -> np.ndarray:
    """The weights divided by the set-point: what ``weights_sum`` describes."""
    w = np.asarray(w)
    return w if case.setpoint is None else w / case.setpoint


def loss_components(p: jax.Array) -> jax.Array:
    """A tiny 3-loss quadratic problem, the losses on different scales."""
    return jnp.stack([jnp.sum((p - 1.0) ** 2), 10.0 * jnp.sum((p + 1.0) ** 2), 0.1 * jnp.sum(p**2)])


P0 = jnp.array([3.0, -2.0, 0.5, 1.0])


@functools.cache
def trained(
    case_id: str,
) -> tuple[optax.GradientTransformationExtraArgs, jax.Array, Any, np.ndarray, np.ndarray]:
    """30 jitted steps of ``chain(balance(b), adam)`` on the quadratic problem.

    Returns the transform, the final parameters and optimizer state, and the
    losses ``[30, K]`` and balancer weights ``[30, K]`` after each step.
    """
    tx = optax.chain(balance(balancer(case_id)), optax.adam(1e-2))

    def step(carry: Any, _: None) -> tuple[Any, tuple[jax.Array, jax.Array]]:
        params, opt_state = carry
        w = get_weights(opt_state)
        (_, losses), grads = value_and_weighted_grad(loss_components)(w, params)
        updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
        return (optax.apply_updates(params, updates), opt_state), (losses, get_weights(opt_state))

    train = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), None, length=30))
    (params, opt_state), (losses, weights) = train(P0, tx.init(P0))
    return tx, params, opt_state, np.asarray(losses), np.asarray(weights)


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", IDS)
def test_init_state_shapes_and_dtypes(case_id):
    case, b = CASE_BY_ID[case_id], balancer(case_id)
    assert b.num_losses == K and isinstance(b.name, str) and b.name
    assert isinstance(b.weights_sum, float) and b.weights_sum > 0
    state = b.init()
    assert isinstance(state, BalancerState)
    chex.assert_shape(state.history, (case.window, K))
    chex.assert_shape([state.initial, state.accum, state.weights], (K,))
    chex.assert_shape([state.filled, state.count, state.rejected, state.accum_count], ())
    chex.assert_type([state.history, state.initial, state.accum, state.weights], jnp.float32)
    chex.assert_type([state.filled, state.count, state.rejected, state.accum_count], jnp.int32)
    for leaf in jax.tree.leaves(state.method_state):
        assert isinstance(leaf, jax.Array)
        assert not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key), "keys must be raw uint32"
    if isinstance(state.method_state, dict) and "key" in state.method_state:
        chex.assert_shape(state.method_state["key"], (2,))
        chex.assert_type(state.method_state["key"], jnp.uint32)
    # Warm-up weights are finite, on the declared scale, times the set-point.
    chex.assert_tree_all_finite(state)
    np.testing.assert_allclose(scale(case, state.weights).sum(), b.weights_sum, rtol=1e-6)


@pytest.mark.parametrize("case_id", IDS)
def test_scan_20_steps_weights_finite_on_declared_scale(case_id):
    case, b = CASE_BY_ID[case_id], balancer(case_id)
    ws, states = run(b, [(b.init(), STREAM), (b.init(), STREAM_2)])
    chex.assert_shape(ws, (2, STEPS, K))
    chex.assert_tree_all_finite((ws, states))
    assert np.all(ws >= 0)
    np.testing.assert_array_equal(states.count, np.broadcast_to(np.arange(1, STEPS + 1), (2, STEPS)))
    np.testing.assert_array_equal(ws, states.weights)
    if case.constant_sum:
        np.testing.assert_allclose(scale(case, ws).sum(axis=-1), b.weights_sum, rtol=1e-5)
    else:
        assert np.all(ws > 0)
    # Adaptive methods do adapt (the fixed baseline must not).
    moved = not np.allclose(ws[0, -1], b.init().weights)
    assert moved == (not case_id.startswith("fixed"))


@pytest.mark.parametrize("case_id", IDS)
def test_jit_equals_eager(case_id):
    b = balancer(case_id)
    ws, states = run(b, [(b.init(), STREAM), (b.init(), STREAM_2)])
    ws_eager, state = eager(b, b.init(), STREAM[:5])
    np.testing.assert_allclose(np.stack(ws_eager), ws[0, :5], rtol=1e-5, atol=1e-6)
    assert_trees_close(state, at(states, 0, 4), rtol=1e-5, atol=1e-6)
    # The optax transform (unbatched, under jit) keeps the same weights as the balancer.
    _, _, _, losses, weights = trained(case_id)
    ws_t, _ = run(b, [(b.init(), losses[:STEPS]), (b.init(), STREAM)])
    np.testing.assert_allclose(weights[:STEPS], ws_t[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case_id", IDS)
def test_non_finite_losses_rejected(case_id):
    b = balancer(case_id)
    losses = STREAM.copy()
    bad_steps = {2: np.nan, 7: np.inf, 8: -np.inf, 12: np.nan}
    for t, bad in bad_steps.items():
        losses[t, t % K] = bad
    keep = [t for t in range(STEPS) if t not in bad_steps]
    clean = np.concatenate([STREAM[keep], STREAM[: len(bad_steps)]])  # padded to STEPS
    ws, states = run(b, [(b.init(), losses), (b.init(), clean)])
    chex.assert_tree_all_finite((ws, states))
    np.testing.assert_array_equal(states.rejected[0], np.cumsum([t in bad_steps for t in range(STEPS)]))
    for t in bad_steps:
        before, after = at(states, 0, t - 1), at(states, 0, t)
        np.testing.assert_array_equal(ws[0, t], before.weights)
        jax.tree.map(np.testing.assert_array_equal, after._replace(rejected=before.rejected), before)
    # Accepted steps behave as if the rejected ones never happened.
    np.testing.assert_allclose(ws[0, keep], ws[1, : len(keep)], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case_id", IDS)
def test_wrong_length_losses_raise(case_id):
    b = balancer(case_id)
    with pytest.raises(ValueError, match=r"shape \[K\]=\(3,\).*got shape \(4,\)"):
        b.update(jnp.ones(4), b.init())
    with pytest.raises(ValueError, match=r"got shape \(3, 1\)"):
        jax.jit(b.update)(jnp.ones((3, 1)), b.init())
    tx = balance(b)
    with pytest.raises(ValueError, match=r"got shape \(2,\)"):
        tx.update(P0, tx.init(P0), P0, losses=jnp.ones(2))


@pytest.mark.parametrize("case_id", IDS)
def test_trains_quadratic_problem_in_optax_chain(case_id):
    _, params, opt_state, losses, weights = trained(case_id)
    chex.assert_tree_all_finite((params, opt_state, losses, weights))
    chex.assert_shape([losses, weights], (30, K))
    assert losses[-1].sum() < losses[0].sum()
    (state,) = find_balancer_states(opt_state)
    assert int(state.count) == 30 and int(state.rejected) == 0
    np.testing.assert_array_equal(get_weights(opt_state), state.weights)


@pytest.mark.parametrize("case_id", IDS)
def test_serialization_round_trip(case_id):
    tx, _, opt_state, _, _ = trained(case_id)
    data = flax.serialization.to_bytes(opt_state)
    restored = flax.serialization.from_bytes(tx.init(P0), data)
    chex.assert_trees_all_equal_structs(restored, opt_state)
    chex.assert_trees_all_equal_dtypes(restored, opt_state)
    chex.assert_trees_all_equal(restored, opt_state)


@pytest.mark.parametrize("case_id", IDS)
def test_vmap_over_two_states_matches_separate_runs(case_id):
    b = balancer(case_id)
    _, states = run(b, [(b.init(), STREAM), (b.init(), STREAM_2)])
    state_a, state_b = at(states, 0, 6), b.init()  # independent: histories, counts, keys differ
    ws, out = run(b, [(state_a, STREAM_2), (state_b, STREAM)])
    # Separate runs: each state paired with itself, so nothing can leak between the two
    # (test_jit_equals_eager compares these batched runs with unbatched ones).
    for i, (state, losses) in enumerate([(state_a, STREAM_2), (state_b, STREAM)]):
        ws_i, out_i = run(b, [(state, losses), (state, losses)])
        np.testing.assert_allclose(ws[i], ws_i[1], rtol=1e-6, atol=1e-7)
        assert_trees_close(at(out, i), at(out_i, 1))
