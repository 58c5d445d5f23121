"""PhysicsNeMo-Sym's LRAnnealing and NTK (tests/data/physicsnemo_aggregators.json), in float64.

The reference is ``physicsnemo/sym/loss/aggregator.py`` of nvidia-physicsnemo-sym 2.4.0, run on a
2-16-1 tanh MLP with three losses. The model is rebuilt from the recorded flat parameters of each
step (torch ``Linear``: ``x @ W.T + b``), the statistic computed by the library's code path on it
(and checked against the statistic of the recorded gradients), and the balancer driven with it
over the recorded steps. Same algorithm, float64: ``rtol=1e-6``.

Timing: PhysicsNeMo multiplies a step's losses by the weights computed in that same call; our
train step applies the weights computed on a step from the next one. The rule is tested on the
recorded sequence: for LRAnnealing the balancer sees step t's statistic at its update t and its
weights are PhysicsNeMo's weights of step t (in a train step they would act at step t + 1). For
NTK (``statistic_at="updated"``, ``update_first=False``) the update at step n - 1 sees the
parameters of step n, which is where PhysicsNeMo evaluates, so the weights acting at each step are
PhysicsNeMo's, except on steps 1 .. n-1, where PhysicsNeMo's are 0 and ours stay 1 (documented in
``ntk_balancer``).
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softadapt_jax as sj
from softadapt_jax.statistics import compute_statistic, statistic_from_grads

DATA = pathlib.Path(__file__).parent / "data" / "physicsnemo_aggregators.json"
KEYS = ("pde", "bc", "data")
SHAPES = {"0.weight": (16, 2), "0.bias": (16,), "2.weight": (1, 16), "2.bias": (1,)}  # param_order
RTOL = 1e-6


@functools.cache
def method(name: str) -> dict:
    return json.loads(DATA.read_text())["methods"][name]


def unflatten(flat: np.ndarray) -> dict:
    """The flat vector (param_order, row-major) as the parameter tree; leading axes kept."""
    flat = jnp.asarray(flat)
    out, offset = {}, 0
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        out[name] = flat[..., offset : offset + size].reshape(*flat.shape[:-1], *shape)
        offset += size
    assert offset == flat.shape[-1]
    return out


def model_losses(inputs: dict):
    """``[3]`` losses of the recorded loss definition: pde, bc (x10), data (x0.01)."""
    data = {k: jnp.asarray(inputs[k]) for k in ("X_pde", "T_pde", "X_bc", "X_data", "T_data")}

    def u(params: dict, x: jax.Array) -> jax.Array:
        h = jnp.tanh(x @ params["0.weight"].T + params["0.bias"])
        return h @ params["2.weight"].T + params["2.bias"]

    def losses(params: dict, batch: None) -> jax.Array:
        del batch
        return jnp.stack(
            [
                jnp.mean((u(params, data["X_pde"]) - data["T_pde"]) ** 2),
                10.0 * jnp.mean(u(params, data["X_bc"]) ** 2),
                0.01 * jnp.mean((u(params, data["X_data"]) - data["T_data"]) ** 2),
            ]
        )

    return losses


def recorded(steps: list[dict], field: str) -> np.ndarray:
    return np.array([[s[field][k] for k in KEYS] for s in steps])


def run_balancer(balancer: sj.Balancer, losses: jax.Array, stats: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Weights before and after each update, over the recorded steps (one update per step)."""

    def body(state, xs):
        weights, new_state = balancer.update(xs[0], state, xs[1])
        return new_state, (state.weights, weights)

    before, after = jax.jit(lambda xs: jax.lax.scan(body, balancer.init(), xs)[1])((losses, stats))
    return np.asarray(before), np.asarray(after)


@pytest.mark.parametrize("case_index", [0, 1])
def test_lr_annealing(x64, case_index: int) -> None:
    case = method("LRAnnealing")["cases"][case_index]
    inputs, steps = case["inputs"], case["inputs"]["steps"]
    kwargs = inputs["kwargs"]
    # ref_key picks the first key containing it; None is the first key.
    reference = next(i for i, k in enumerate(KEYS) if kwargs.get("ref_key", KEYS[0]) in k)
    balancer = sj.lr_annealing_balancer(
        num_losses=3,
        convention="physicsnemo",
        reference=reference,
        **{k: kwargs[k] for k in ("alpha",) if k in kwargs},
        **({"update_every": kwargs["update_freq"]} if "update_freq" in kwargs else {}),
    )
    assert balancer.statistic_at == "current"
    assert balancer.schedule == (1, kwargs.get("update_freq", 1), 1, True)
    options = dict(balancer.statistic_options)
    assert options == {"params_filter": "all", "mean_over": "entries"}

    losses_fn = model_losses(inputs)
    params = unflatten(np.array([s["params"] for s in steps]))
    losses, stats = jax.jit(
        jax.vmap(lambda p: (losses_fn(p, None), compute_statistic("grad_abs", losses_fn, p, None, **options)))
    )(params)
    np.testing.assert_allclose(losses, recorded(steps, "losses"), rtol=1e-12)  # the rebuild itself
    grads = unflatten(recorded(steps, "grads"))  # leaves [steps, 3, *shape]
    from_recorded = jax.vmap(lambda g: statistic_from_grads("grad_abs", g, **options))(grads)
    np.testing.assert_allclose(stats, from_recorded, rtol=1e-10)

    before, after = run_balancer(balancer, losses, stats)
    expected = case["expected"]["steps"]
    np.testing.assert_allclose(after, recorded(expected, "effective_weights"), rtol=RTOL)
    np.testing.assert_allclose(before, np.array([s["state_before"]["lmbda_ema"] for s in steps]), rtol=RTOL)


def test_ntk(x64) -> None:
    (case,) = method("NTK")["cases"]
    inputs, steps = case["inputs"], case["inputs"]["steps"]
    n = inputs["run_per_step"]
    balancer = sj.ntk_balancer(num_losses=3, convention="physicsnemo", update_every=n)
    assert balancer.statistic == "sqrt_loss_grad_norm"
    assert balancer.statistic_at == "updated" and balancer.schedule == (1, n, 1, False)

    losses_fn = model_losses(inputs)
    params = unflatten(np.array([s["params"] for s in steps]))
    options = dict(balancer.statistic_options)
    losses, stats = jax.jit(
        jax.vmap(
            lambda p: (
                losses_fn(p, None),
                compute_statistic(balancer.statistic, losses_fn, p, None, **options),
            )
        )
    )(params)
    np.testing.assert_allclose(losses, recorded(steps, "losses"), rtol=1e-12)
    norms = np.linalg.norm(recorded(steps, "grads_of_sqrt_loss"), axis=-1)  # [steps, 3]
    np.testing.assert_allclose(stats, norms, rtol=1e-10)

    # The update after step t sees the parameters of step t + 1 (statistic_at="updated").
    _, after = run_balancer(balancer, losses[:-1], stats[1:])
    used = np.concatenate([np.ones((1, 3)), after])  # weights acting at steps 0 .. T-1
    want = recorded(case["expected"]["steps"], "effective_weights")
    np.testing.assert_allclose(used[n:], want[n:], rtol=RTOL)
    np.testing.assert_array_equal(want[0], 1.0)
    np.testing.assert_array_equal(want[1:n], 0.0)  # PhysicsNeMo's vanishing loss ...
    np.testing.assert_array_equal(used[:n], 1.0)  # ... which ours replaces by weights 1
    # Between evaluations the weights are held, and there is no smoothing.
    for start in range(n, len(want), n):
        np.testing.assert_allclose(
            used[start : start + n], np.broadcast_to(used[start], used[start : start + n].shape)
        )
