"""The contract every method meets: one case list, the property asserts of ``_asserts.py``.

``CASES`` holds every balancer factory of ``balancers/`` (the gradient-statistics
ones fed a synthetic statistic made from the losses), every aggregator of the
registry, and every other gradient-level optax transform (PCGrad, MGDA, CAGrad,
GradNorm, ResNorm). Each test applies the asserts of one promise to the cases of
the kinds that make it. Per case one program computes what its tests check: a
vmapped scan for a balancer (plus one optax training run), one ``pmap`` on 4
devices for a gradient-level method, so each case is compiled a handful of
times. Hand-computed values and parity with the original implementations are in
the per-method and ``test_parity_*`` modules.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _asserts import (
    assert_balancer_state_structure,
    assert_batch_matches_single,
    assert_buffers_not_shared,
    assert_on_declared_scale,
    assert_rejects_non_finite,
    assert_serialization_round_trip,
    assert_setpoint_multiplies,
    assert_trains,
    assert_trees_close,
    at,
)

from softadapt_jax import balancers
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
from softadapt_jax.gradients import cagrad, gradnorm, mgda, pcgrad, resnorm
from softadapt_jax.gradients.aggregators import aggregator, names
from softadapt_jax.statistics import statistic_shape
from softadapt_jax.transform import balance, find_balancer_states, get_weights, value_and_weighted_grad

# ------------------------------------------------------------------------------------- the cases

K = 3  # losses of the balancer cases
K_TASKS, N, DEVICES = 5, 6, 4  # tasks and parameters of the gradient-level cases, pmap devices
SETPOINT = np.array([2.0, 0.5, 1.5])


def synthetic_statistic(b: Balancer) -> Balancer:
    """``b`` with its gradient statistic made from the losses: a loss-statistics balancer for the suite.

    The statistic has the kind's shape, is positive where the losses are, and non-finite
    where they are (as a real one would be on a non-finite step).
    """
    rows = b.num_losses if b.groups is None else max(b.groups) + 1

    def update(losses: Any, state: BalancerState, statistics: Any = None) -> tuple[jax.Array, BalancerState]:
        del statistics
        # Sized to the rows whatever the losses' shape, so that a wrong one reaches the balancer's check.
        base = jnp.resize(jnp.sqrt(jnp.abs(jnp.ravel(jnp.asarray(losses, jnp.float32)))), rows) + 0.5
        shape = statistic_shape(b.statistic, rows)
        stats = base if len(shape) == 1 else jnp.stack([3.0 * base, base], axis=1)  # grad_abs: [max, mean]
        return b.update(losses, state, stats)

    return b._replace(update=update, statistic=None)


@dataclasses.dataclass(frozen=True)
class Case:
    """One method in one configuration, and what the suite may assume about it.

    ``kind`` says which promises apply: "balancer" (a ``Balancer``), "aggregator" (a registry
    ``Aggregator``, run through ``aggregate``), "transform" (an optax transform over stacked
    per-component gradients, built with ``axis_name=``).
    """

    id: str
    kind: str
    factory: Callable[..., Any]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    window: int = 1  # balancers: history rows
    constant_sum: bool = True  # balancers: the weights always sum to ``weights_sum`` (times the set-point)
    synthetic: bool = False  # balancers: a gradient-statistics method fed a synthetic statistic

    @property
    def setpoint(self) -> np.ndarray | None:
        return self.config.get("setpoint")

    def build(self, **overrides: Any) -> Any:
        """The method, configured by ``config`` with ``overrides`` on top."""
        config = {**self.config, **overrides}
        if self.kind == "balancer":
            b = self.factory(**{"num_losses": K, **config})
            return synthetic_statistic(b) if self.synthetic else b
        return self.factory(**config)


def _balancer(id: str, factory: Callable[..., Balancer], rows: int = 1, **config: Any) -> Case:
    """A balancer case: ``rows`` history rows, ``config`` the factory's options (and the Case flags)."""
    flags = {f: config.pop(f) for f in ("constant_sum", "synthetic") if f in config}
    return Case(id, "balancer", factory, config, rows, **flags)


# Methods of the registry without defaults for a required constructor argument (as in torchjd).
AGGREGATOR_CONFIG: dict[str, dict[str, Any]] = {
    "cagrad": {"c": 0.5},
    "fairgrad": {"alpha": 1.0},
    "krum": {"n_byzantine": 1},
    "trimmed_mean": {"trim_number": 1},
}
THREE_BATCHES = ("modo", "sdmgrad")  # read the gradients of three batches: jacobian [3, K, n]

# Every balancer (SoftAdapt in each variant) with option combinations (set-point, update_every,
# accumulate, averaging, non-default weights); every aggregator; every other gradient transform.
CASES = [
    _balancer("fixed", fixed_balancer),
    _balancer("fixed_weights_setpoint", fixed_balancer, weights=[1.0, 3.0, 0.5], setpoint=SETPOINT),
    _balancer("softadapt_original", softadapt_balancer, 5, variant="original"),
    _balancer("softadapt_normalized", softadapt_balancer, 5, variant="normalized"),
    _balancer(
        "softadapt_loss_weighted_sum_to_k_setpoint", softadapt_balancer, 3,
        variant="loss_weighted", window=3, sum_to_k=True, setpoint=SETPOINT,
    ),
    _balancer("ratio_softadapt", ratio_softadapt_balancer, 2),
    _balancer(
        "relobralo_setpoint_every2", relobralo_balancer, expected_rho=0.5, setpoint=SETPOINT, update_every=2
    ),
    _balancer("dwa_average2_accumulate2", dwa_balancer, 4, average_over=2, accumulate=2),
    _balancer("uncertainty", uncertainty_balancer, constant_sum=False),
    _balancer("rlw", rlw_balancer),
    _balancer(
        "lr_annealing_every3", lr_annealing_balancer, update_every=3, constant_sum=False, synthetic=True
    ),
    _balancer(
        "lr_annealing_physicsnemo_setpoint", lr_annealing_balancer,
        convention="physicsnemo", update_every=2, setpoint=SETPOINT, constant_sum=False, synthetic=True,
    ),
    _balancer(
        "inverse_grad_norm_every2", inverse_grad_norm_balancer,
        update_every=2, constant_sum=False, synthetic=True,
    ),
    _balancer("ntk_every4", ntk_balancer, update_every=4, constant_sum=False, synthetic=True),
    *[Case(n, "aggregator", aggregator, {"name": n, **AGGREGATOR_CONFIG.get(n, {})}) for n in names()],
    Case("transform_pcgrad", "transform", pcgrad, {"seed": 0}),
    Case("transform_mgda", "transform", mgda),
    Case("transform_mgda_loss+", "transform", mgda, {"normalization": "loss+"}),
    Case("transform_cagrad", "transform", cagrad, {"c": 0.5}),
    Case("transform_gradnorm", "transform", gradnorm, {"num_losses": K_TASKS, "layer": "w"}),
    Case("transform_resnorm", "transform", resnorm, {"num_losses": K_TASKS}),
]  # fmt: skip
CASE_BY_ID = {c.id: c for c in CASES}

MGDA_LIBMTL_VMAP = (
    "known defect: LibMTL's min-norm solver (the default convention of gradients.mgda) stops once a "
    "step changes the weights by less than tol=1e-5 (L1), so the rounding of a batched Gramian can move "
    "its stopping step: on this case's second Jacobian a vmapped call and a single call differ by 3.5e-5"
)


def ids(*kinds: str, xfail: dict[str, str] | None = None) -> list[Any]:
    """The ids of the cases of ``kinds``, those in ``xfail`` marked as strict xfails with their reason."""
    xfail = xfail or {}
    return [
        pytest.param(c.id, marks=pytest.mark.xfail(strict=True, reason=xfail[c.id]))
        if c.id in xfail
        else c.id
        for c in CASES
        if c.kind in kinds
    ]


BALANCERS = ids("balancer")
GRADIENT_METHODS = ids("aggregator", "transform")


def test_case_list_holds_every_method() -> None:
    factories = {c.factory for c in CASES}
    skip = {"make_balancer", "grad_norm_balancer"}  # the builder of the others; a deprecated name
    exported = {n for n in balancers.__all__ if n.endswith("_balancer") and n not in skip}
    assert {getattr(balancers, n) for n in exported} <= factories
    assert {pcgrad, mgda, cagrad, gradnorm, resnorm} <= factories
    assert {c.id for c in CASES if c.kind == "aggregator"} == set(names())


# ------------------------------------------------------------------------------------- balancers

STEPS = 20
_rng = np.random.default_rng(7)
STREAM = (
    np.array([1.0, 20.0, 0.05])
    * np.exp(-0.1 * np.arange(STEPS)[:, None] * np.array([1.0, 0.2, 3.0]))
    * np.exp(0.1 * _rng.normal(size=(STEPS, K)))
).astype(np.float32)
STREAM_2 = (np.sqrt(STREAM[::-1]) * 3.0).astype(np.float32)


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


def eager(b: Balancer, state: Any, losses: np.ndarray) -> tuple[list[jax.Array], Any]:
    """Op-by-op updates (``jax.disable_jit``): the weights after each step, and the final state."""
    ws = []
    with jax.disable_jit():
        for loss in losses:
            w, state = b.update(loss, state)
            ws.append(w)
    return ws, state


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


@pytest.mark.parametrize("case_id", BALANCERS)
def test_init_state_is_plain_finite_and_on_declared_scale(case_id):
    case, b = CASE_BY_ID[case_id], balancer(case_id)
    assert b.num_losses == K and isinstance(b.name, str) and b.name
    assert isinstance(b.weights_sum, float) and b.weights_sum > 0
    state = b.init()
    assert_balancer_state_structure(state, window=case.window, num_losses=K)
    # Warm-up weights are on the declared scale, times the set-point.
    assert_on_declared_scale(state.weights, b.weights_sum, setpoint=case.setpoint, rtol=1e-6)


@pytest.mark.parametrize("case_id", BALANCERS)
def test_fresh_states_share_no_buffer_so_a_step_can_donate_them(case_id):
    b = balancer(case_id)
    tx = balance(b)
    assert_buffers_not_shared(b.init(), b.init(), tx.init(P0), tx.init(P0))


@pytest.mark.parametrize("case_id", BALANCERS)
def test_setpoint_multiplies_the_weights_from_init_on(case_id):
    # The hand computations of each method check ``weights = setpoint * formula`` step by step.
    case = CASE_BY_ID[case_id]
    setpoint = np.array([0.5, 4.0, 1.0]) if case.setpoint is None else case.setpoint
    assert_setpoint_multiplies(
        case.build(setpoint=setpoint).init().weights, case.build(setpoint=None).init().weights, setpoint
    )


@pytest.mark.parametrize("case_id", BALANCERS)
def test_scan_20_steps_weights_finite_on_declared_scale(case_id):
    case, b = CASE_BY_ID[case_id], balancer(case_id)
    ws, states = run(b, [(b.init(), STREAM), (b.init(), STREAM_2)])
    assert ws.shape == (2, STEPS, K)
    assert_on_declared_scale(ws, b.weights_sum, setpoint=case.setpoint, constant_sum=case.constant_sum)
    np.testing.assert_array_equal(states.count, np.broadcast_to(np.arange(1, STEPS + 1), (2, STEPS)))
    np.testing.assert_array_equal(ws, states.weights)
    # Adaptive methods do adapt (the fixed baseline must not).
    moved = not np.allclose(ws[0, -1], b.init().weights)
    assert moved == (case.factory is not fixed_balancer)


@pytest.mark.parametrize("case_id", BALANCERS)
def test_jit_equals_eager_and_the_optax_transform(case_id):
    b = balancer(case_id)
    ws, states = run(b, [(b.init(), STREAM), (b.init(), STREAM_2)])
    ws_eager, state = eager(b, b.init(), STREAM[:5])
    np.testing.assert_allclose(np.stack(ws_eager), ws[0, :5], rtol=1e-5, atol=1e-6)
    assert_trees_close(state, at(states, 0, 4), rtol=1e-5, atol=1e-6)
    # The optax transform (unbatched, under jit) keeps the same weights as the balancer.
    _, _, _, losses, weights = trained(case_id)
    ws_t, _ = run(b, [(b.init(), losses[:STEPS]), (b.init(), STREAM)])
    np.testing.assert_allclose(weights[:STEPS], ws_t[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case_id", BALANCERS)
def test_non_finite_losses_rejected(case_id):
    b = balancer(case_id)
    losses = STREAM.copy()
    bad_steps = {2: np.nan, 7: np.inf, 8: -np.inf, 12: np.nan}
    for t, bad in bad_steps.items():
        losses[t, t % K] = bad
    keep = [t for t in range(STEPS) if t not in bad_steps]
    clean = np.concatenate([STREAM[keep], STREAM[: len(bad_steps)]])  # padded to STEPS
    ws, states = run(b, [(b.init(), losses), (b.init(), clean)])
    assert_rejects_non_finite(ws[0], at(states, 0), set(bad_steps), ws[1])


@pytest.mark.parametrize("case_id", BALANCERS)
def test_vmap_over_two_states_matches_separate_runs(case_id):
    b = balancer(case_id)
    _, states = run(b, [(b.init(), STREAM), (b.init(), STREAM_2)])
    state_a, state_b = at(states, 0, 6), b.init()  # independent: histories, counts, keys differ
    ws, out = run(b, [(state_a, STREAM_2), (state_b, STREAM)])
    # Separate runs: each state paired with itself, so nothing can leak between the two
    # (test_jit_equals_eager_and_the_optax_transform compares batched runs with unbatched ones).
    for i, (state, losses) in enumerate([(state_a, STREAM_2), (state_b, STREAM)]):
        ws_i, out_i = run(b, [(state, losses), (state, losses)])
        assert_batch_matches_single(ws[i : i + 1], [ws_i[1]])
        assert_trees_close(at(out, i), at(out_i, 1))


@pytest.mark.parametrize("case_id", BALANCERS)
def test_trains_quadratic_problem_in_optax_chain(case_id):
    tx, params, opt_state, losses, weights = trained(case_id)
    assert losses.shape == weights.shape == (30, K)
    assert_trains(losses)
    assert np.all(np.isfinite(weights)) and np.all(np.isfinite(params))
    (state,) = find_balancer_states(opt_state)
    assert int(state.count) == 30 and int(state.rejected) == 0
    np.testing.assert_array_equal(get_weights(opt_state), state.weights)
    assert_serialization_round_trip(opt_state, tx.init(P0))


@pytest.mark.parametrize("case_id", BALANCERS)
def test_wrong_or_missing_losses_raise_naming_the_shape(case_id):
    b = balancer(case_id)
    for shape in [(4,), (1, K), ()]:
        with pytest.raises(
            ValueError,
            match=re.escape(f"shape [K]=(3,) to match the balancer's num_losses=3, got shape {shape}."),
        ):
            b.update(jnp.ones(shape), b.init())
    with pytest.raises(ValueError, match=r"num_losses=3, got shape \(3, 1\)"):
        jax.jit(b.update)(jnp.ones((3, 1)), b.init())
    tx = balance(b)
    with pytest.raises(ValueError, match=r"got shape \(2,\)"):
        tx.update(P0, tx.init(P0), P0, losses=jnp.ones(2))
    with pytest.raises(ValueError, match=r"needs the current component losses.*`losses` of shape \(3,\)"):
        tx.update(P0, tx.init(P0), P0)


# (option, exception, message) for the shared options every balancer factory validates.
COMMON_ERRORS = [
    ({"num_losses": 0}, ValueError, r"`num_losses` must be an integer >= 1, got 0\."),
    ({"update_every": 0}, ValueError, r"`update_every` must be an integer >= 1, got 0\."),
    ({"update_every": 2.0}, TypeError, r"`update_every` must be an integer >= 1, got 2\.0 of type float"),
    ({"accumulate": -1}, ValueError, r"`accumulate` must be an integer >= 1, got -1\."),
    ({"setpoint": np.ones(2)}, ValueError, r"`setpoint` must have shape \(3,\), got \(2,\)\."),
    ({"setpoint": np.array([1.0, -1.0, 1.0])}, ValueError, r"`setpoint` must be finite and >= 0"),
    ({"dtype": jnp.float16}, ValueError, r"`dtype` must be float32 or float64, got float16\."),
]


# Each balancer case with each shared option its factory takes (the gradient-statistics ones
# have no ``accumulate``).
OPTION_CASES = [
    pytest.param(c.id, option, exc, match, id=f"{c.id}-{name}={value!s:.8}")
    for c in CASES
    if c.kind == "balancer"
    for option, exc, match in COMMON_ERRORS
    for name, value in option.items()
    if name in inspect.signature(c.factory).parameters
]


@pytest.mark.parametrize("case_id,option,exc,match", OPTION_CASES)
def test_common_options_are_validated(case_id, option, exc, match):
    with pytest.raises(exc, match=match):
        CASE_BY_ID[case_id].build(**option)
