"""The contract, gradient-level half: every aggregator of the registry and every gradient optax transform.

The cases and the case list are those of ``test_contract.py`` (one list for every method); this
module holds the tests of the gradient-level kinds, so that the two halves run in parallel.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _asserts import (
    assert_batch_matches_single,
    assert_buffers_not_shared,
    assert_expected_structure,
    assert_replicas_agree,
    assert_trains,
    at,
)
from test_contract import (
    CASE_BY_ID,
    DEVICES,
    GRADIENT_METHODS,
    K_TASKS,
    MGDA_LIBMTL_VMAP,
    THREE_BATCHES,
    Case,
    N,
    ids,
)

from softadapt_jax import gradients
from softadapt_jax.gradients import per_component_grads
from softadapt_jax.gradients.aggregators import Aggregator, aggregate, aggregator, names

# ------------------------------------------------------------------------ gradient-level methods

LOSSES = np.array([1.5, 0.75, 2.0, 0.5, 1.25], np.float32)
TASK_SCALES = np.array([1.0, 10.0, 0.1, 2.0, 0.5], np.float32)
TASK_CENTERS = (np.arange(K_TASKS * N).reshape(K_TASKS, N) % 5 / 4 - 0.5).astype(np.float32)


def jacobians(batch: int, case: Case, seed: int = 0) -> np.ndarray:
    """``[batch, K, N]`` (``[batch, 3, K, N]`` for three-batch methods) with entries in eighths.

    Multiples of 1/8 of moderate size add exactly in float32, so the mean over
    devices of the pmap test is the single-device Jacobian bit for bit.
    """
    shape = (batch, 3, K_TASKS, N) if case.config.get("name") in THREE_BATCHES else (batch, K_TASKS, N)
    return (np.round(np.random.default_rng(seed).normal(size=shape) * 8) / 8).astype(np.float32)


def call(agg: Aggregator, jac: jax.Array, key: jax.Array) -> jax.Array:
    """One update from a fresh state (the state's first step), with losses and a key if needed."""
    losses = jnp.asarray(LOSSES) if agg.needs_losses else None
    key = key if agg.needs_key else None
    if agg.stateful:
        state = agg.init(K_TASKS, N, jac.dtype)
        direction, _ = agg.update(jac, state, losses=losses, key=key)
        return direction
    return agg(jac, losses=losses, key=key)


def task_losses(params: dict[str, jax.Array]) -> jax.Array:
    """K_TASKS conflicting quadratics on different scales: ``s_k * |w - c_k|^2``."""
    return TASK_SCALES * jnp.sum((params["w"] - TASK_CENTERS) ** 2, axis=1)


def train(tx: optax.GradientTransformationExtraArgs, steps: int = 30) -> jax.Array:
    """The losses ``[steps, K]`` of ``chain(tx, adam)`` trained on :func:`task_losses` (per-component)."""
    chain = optax.chain(tx, optax.adam(3e-2))

    def step(carry: Any, _: None) -> tuple[Any, jax.Array]:
        params, state = carry
        losses, grads = per_component_grads(task_losses)(params)
        updates, state = chain.update(grads, state, params, losses=losses)
        return (optax.apply_updates(params, updates), state), losses

    params = {"w": jnp.full(N, 2.0, jnp.float32)}
    return jax.lax.scan(step, (params, chain.init(params)), None, length=steps)[1]


@functools.cache
def gradient_run(case_id: str) -> dict[str, Any]:
    """Everything the gradient-level contract checks, from one ``pmap`` program (one compilation).

    On each of 4 devices: the optax transform with ``axis_name`` on that device's shard of the
    gradients (three-batch aggregators: a ``pmean`` before the call), single calls on the global
    Jacobian J and on a second one, and a vmapped batch of calls whose first two elements they
    are; for a transform also its state after the step, and a 30-step training run.
    """
    case = CASE_BY_ID[case_id]
    batch = jacobians(3, case)
    jac = batch[0]
    offsets = np.array([1.0, -1.0, 0.5, -0.5], np.float32).reshape(DEVICES, *([1] * jac.ndim))
    shards = jac[None] + offsets * np.sign(jac)[None] * 0.25  # their mean is jac, exactly
    key = jax.random.PRNGKey(5)
    params = {"w": jnp.zeros(N, jnp.float32)}
    if case.kind == "aggregator":
        agg = case.build()
        tx = aggregate(agg, num_tasks=K_TASKS, axis_name="d", seed=0)
        losses = jnp.asarray(LOSSES) if agg.needs_losses else None
    else:
        tx, plain, losses = case.build(axis_name="d"), case.build(), jnp.asarray(LOSSES)

    def per_device(shard: jax.Array, js: jax.Array, k: jax.Array) -> dict[str, Any]:
        # The single (unbatched) calls run as one lax.map: a loop of the unbatched program, so
        # the solver is compiled once for all of them rather than once per call.
        if case.kind == "aggregator":
            # The adapter splits its key once per step and hands the second half to the method:
            # a keyed method's adapted update is the single call with that half.
            rows, keys = [0, 1], [k, k]
            if agg.needs_key and case.config["name"] not in THREE_BATCHES:
                rows, keys = [0, 1, 0], [k, k, jax.random.split(k)[1]]
            singles = jax.lax.map(lambda a: call(agg, a[0], a[1]), (js[jnp.asarray(rows)], jnp.stack(keys)))
            out = {
                "single": singles[0],
                "single1": singles[1],
                "vmapped": jax.vmap(lambda x: call(agg, x, k))(js),
                "want": singles[2] if len(rows) == 3 else singles[0],
            }
            if case.config["name"] in THREE_BATCHES:
                out["adapted"] = call(agg, jax.lax.pmean(shard, "d"), k)
                return out
            state = tx.init(params)
            if agg.needs_key:
                state = state._replace(key=k)
        else:
            state = plain.init(params)

            def update(j: jax.Array) -> tuple[jax.Array, Any]:
                u, s = plain.update({"w": j}, state, params, losses=losses)
                return u["w"], s

            singles, states = jax.lax.map(update, js[:2])
            out = {
                "single": singles[0],
                "single1": singles[1],
                "vmapped": jax.vmap(lambda j: update(j)[0])(js),
                "want": singles[0],
                "want_state": jax.tree.map(lambda x: x[0], states),
                "losses": train(plain),
            }
            state = tx.init(params)
        updates, out["state"] = tx.update({"w": shard}, state, params, losses=losses)
        out["adapted"] = updates["w"]
        return out

    run_all = jax.pmap(per_device, axis_name="d", in_axes=(0, None, None))
    return jax.tree.map(np.asarray, run_all(shards, batch, key))


@pytest.mark.parametrize(
    "case_id",
    ids("aggregator", "transform", xfail={"transform_mgda": MGDA_LIBMTL_VMAP}),
)
def test_jits_and_vmaps(case_id: str) -> None:
    out = gradient_run(case_id)
    assert_expected_structure(out["single"][0], (N,))
    assert out["vmapped"].shape == (DEVICES, 3, N)
    assert_batch_matches_single(out["vmapped"][0], [out["single"][0], out["single1"][0]])


@pytest.mark.parametrize("case_id", GRADIENT_METHODS)
def test_pmap_with_axis_name_equals_one_device(case_id: str) -> None:
    # Every device holds the gradients of its shard; their mean is the global Jacobian J. The
    # transform gives every replica the update of J, equal to the single-device one (the
    # aggregate adapter takes the Gramian route for Gramian weightings, the call the Jacobian
    # route), and a transform's state after the step is the single-device state.
    out = gradient_run(case_id)
    assert_replicas_agree(out["adapted"], out["want"][0])
    if "want_state" in out:
        assert_replicas_agree(out["state"], at(out["want_state"], 0))


@pytest.mark.parametrize("case_id", GRADIENT_METHODS)
def test_fresh_states_share_no_buffer_so_a_step_can_donate_them(case_id: str) -> None:
    case = CASE_BY_ID[case_id]
    params = {"w": jnp.zeros(N, jnp.float32)}
    if case.kind == "aggregator":
        agg = case.build()
        tx = aggregate(agg, num_tasks=K_TASKS, seed=0)
        states = [tx.init(params), tx.init(params)]
        if agg.stateful:
            states += [agg.init(K_TASKS, N, jnp.float32), agg.init(K_TASKS, N, jnp.float32)]
    else:
        tx = case.build()
        states = [tx.init(params), tx.init(params)]
    assert_buffers_not_shared(*states)


@pytest.mark.parametrize("case_id", ids("transform"))
def test_transform_trains_in_an_optax_chain(case_id: str) -> None:
    assert_trains(gradient_run(case_id)["losses"][0])


def test_registry_holds_every_method_by_its_name() -> None:
    torchjd = {
        "mean", "sum", "upgrad", "mgda", "dual_proj", "cagrad", "imtl_g", "aligned_mtl", "config",
        "fairgrad", "trimmed_mean", "krum", "nash_mtl", "pcd", "excess_mtl", "pcgrad", "gradvac",
        "graddrop", "random",
    }  # fmt: skip
    libmtl_only = {"gls", "stch", "famo", "db_mtl", "moco", "modo", "sdmgrad", "imtl"}
    assert set(names()) == torchjd | libmtl_only
    assert gradients.aggregator is aggregator


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"`name` must be one of \['aligned_mtl', .*'upgrad'\], got 'upgrade'"
    ):
        aggregator("upgrade")


def test_required_constructor_argument_is_named() -> None:
    with pytest.raises(TypeError, match="c"):
        aggregator("cagrad")


def test_optax_adapter_masks_task_specific_leaves() -> None:
    agg = CASE_BY_ID["mean"].build()
    tx = aggregate(agg, mask={"shared": True, "head": False})
    params = {"shared": jnp.zeros(N), "head": jnp.zeros(2)}
    jac = jnp.asarray(jacobians(1, CASE_BY_ID["mean"])[0])
    heads = jnp.arange(2 * K_TASKS, dtype=jnp.float32).reshape(K_TASKS, 2)
    updates, _ = jax.jit(tx.update)({"shared": jac, "head": heads}, tx.init(params), params)
    np.testing.assert_allclose(updates["shared"], agg(jac), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["head"], heads.sum(0))


def test_optax_adapter_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match="`agg` must be an Aggregator"):
        aggregate("upgrad")
    with pytest.raises(ValueError, match="pass `num_tasks=K`"):
        aggregate(CASE_BY_ID["nash_mtl"].build())
    tx = aggregate(CASE_BY_ID["gls"].build())
    params = {"w": jnp.zeros(N)}
    with pytest.raises(ValueError, match=r"reads the current losses: pass `losses=` of shape \(5,\)"):
        tx.update({"w": jnp.ones((K_TASKS, N))}, tx.init(params), params)


def test_stateless_call_of_a_stateful_method_says_how_to_use_it() -> None:
    with pytest.raises(TypeError, match="keeps state between calls"):
        CASE_BY_ID["pcd"].build()(jnp.ones((K_TASKS, N)))


def test_random_method_without_key_says_so() -> None:
    with pytest.raises(ValueError, match="draws random numbers"):
        CASE_BY_ID["random"].build()(jnp.ones((K_TASKS, N)))


def test_adapter_is_an_optax_transform_in_a_chain() -> None:
    tx = optax.chain(aggregate(CASE_BY_ID["mean"].build()), optax.sgd(1.0))
    params = {"w": jnp.zeros(N)}
    jac = jnp.asarray(jacobians(1, CASE_BY_ID["mean"])[0])
    updates, _ = tx.update({"w": jac}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -jac.mean(0), rtol=1e-6)


def test_stateful_adapter_sizes_its_state_by_the_shared_leaves() -> None:
    # ExcessMTL keeps per-entry statistics [K, n]: n is the number of shared entries, not of all.
    agg = CASE_BY_ID["excess_mtl"].build()
    tx = aggregate(agg, num_tasks=K_TASKS, mask={"shared": True, "head": False})
    params = {"shared": jnp.zeros(N), "head": jnp.zeros(2)}
    jac = jnp.asarray(jacobians(1, CASE_BY_ID["excess_mtl"])[0])
    heads = jnp.ones((K_TASKS, 2))
    updates, _ = jax.jit(tx.update)({"shared": jac, "head": heads}, tx.init(params), params)
    direction, _ = agg.update(jac, agg.init(K_TASKS, N, jnp.float32))
    np.testing.assert_allclose(updates["shared"], direction, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["head"], heads.sum(0))
