"""Learning-rate annealing against the authors' TF1 code (tests/data/lr_annealing_wang2021.json).

The reference is GradientPathologiesPINNs at commit 93e752b, ``Helmholtz/Helmholtz2D_model_tf.py``
(model M2), run in float32 TF graph mode. The network [2, 50, 50, 50, 1] (tanh, ``H @ W + b``) is
rebuilt from the recorded weights; the recorded points are already normalised. TF stores the
biases as ``[1, n]``; here they are ``[n]``, so that the default ``params_filter="kernels"``
(leaves with ``ndim >= 2``) selects the four weight matrices, as the original does.

Tolerances: the reference computed every gradient in float32. Its per-entry rounding, through the
second derivatives of the residual and the 128-point means, is a few float32 ulps of relative
error; our float64 (or float32, in another order of operations) evaluation differs from it by that
much, so the gradient statistics and lambda_hat are compared at ``F32_RTOL = 1e-5``. The README
reports 1.3e-6 (float32) and 8.4e-7 (float64) for an independent rebuild.
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

import softadapt_jax as sj
from softadapt_jax import training
from softadapt_jax.balancers.base import group_sum
from softadapt_jax.gradients import per_component_grads
from softadapt_jax.statistics import compute_statistic, per_leaf_grad_abs

DATA = pathlib.Path(__file__).parent / "data" / "lr_annealing_wang2021.json"
TERMS = ("res", "bc1", "bc2", "bc3", "bc4")
GROUPS = (0, 1, 1, 1, 1)  # the four edges share one lambda, from their summed loss
F32_RTOL = 1e-5


@functools.cache
def method() -> dict:
    return json.loads(DATA.read_text())["methods"]["lr_annealing"]


def snapshot_cases() -> list[dict]:
    return [c for c in method()["cases"] if "weights" in c["inputs"]]


def trajectory() -> dict:
    (case,) = [c for c in method()["cases"] if c["id"].endswith("_trajectory")]
    return case


def network(params: dict, x: jax.Array) -> jax.Array:
    h = x
    for layer, (w, b) in enumerate(zip(params["weights"], params["biases"], strict=True)):
        h = h @ w + b
        if layer < len(params["weights"]) - 1:
            h = jnp.tanh(h)
    return h[..., 0]


def helmholtz_losses(sigma: jax.Array, lam: float):
    """``[5]`` losses: mean (f - r)^2 on the residual points and mean (u* - u)^2 on each edge.

    ``r = u_x1x1 / sigma_1^2 + u_x2x2 / sigma_2^2 + lam u``, derivatives w.r.t. the normalised
    inputs, as the original's operator.
    """

    def losses(params: dict, batch: dict) -> jax.Array:
        def u(x: jax.Array) -> jax.Array:
            return network(params, x)

        x = batch["res"]["x"]

        def second_derivative(axis: int) -> jax.Array:
            # Rows are independent points, so an all-rows tangent along one axis gives each row's own.
            e = jnp.zeros_like(x).at[:, axis].set(1.0)
            return jax.jvp(lambda y: jax.jvp(u, (y,), (e,))[1], (x,), (e,))[1]

        r = second_derivative(0) / sigma[0] ** 2 + second_derivative(1) / sigma[1] ** 2 + lam * u(x)
        edges = [jnp.mean((batch[k]["t"] - u(batch[k]["x"])) ** 2) for k in TERMS[1:]]
        return jnp.stack([jnp.mean((batch["res"]["t"] - r) ** 2), *edges])

    return losses


def case_params(inputs: dict, dtype, suffix: str = "", xp=jnp) -> dict:
    return {
        "weights": [xp.asarray(w, dtype) for w in inputs["weights" + suffix]],
        "biases": [xp.asarray(np.ravel(b), dtype) for b in inputs["biases" + suffix]],
    }


def case_batch(inputs: dict, dtype) -> dict:
    return {
        k: {
            "x": jnp.asarray(inputs["batch"][k]["X_normalized"], dtype),
            "t": jnp.asarray(np.ravel(inputs["batch"][k]["target"]), dtype),
        }
        for k in TERMS
    }


def stacked(trees: list) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def with_lambda(balancer: sj.Balancer, lam: jax.Array) -> sj.BalancerState:
    """The balancer's initial state, holding lambda for the boundary group."""
    state = balancer.init()
    ema = jnp.stack([jnp.ones_like(lam), lam]).astype(state.method_state.ema.dtype)
    return state._replace(method_state=state.method_state._replace(ema=ema))


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want) / np.abs(want)))


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_snapshots_statistic_and_lambda(dtype_name: str) -> None:
    """The statistic by the train step's code path, and lambda after the update, per snapshot."""
    cases = snapshot_cases()
    with jax.enable_x64(dtype_name == "float64"):
        dtype = jnp.dtype(dtype_name)
        balancer = sj.lr_annealing_balancer(num_losses=5, groups=GROUPS)
        estimate_only = sj.lr_annealing_balancer(
            num_losses=5, groups=GROUPS, alpha=1.0
        )  # lambda_new = lambda_hat
        options = dict(balancer.statistic_options)

        def one_case(params, batch, sigma, lam_before, lam_model):
            fn = helmholtz_losses(sigma, lam_model)
            stats = compute_statistic(balancer.statistic, fn, params, batch, groups=GROUPS, **options)
            _, grads = per_component_grads(lambda p, b: group_sum(fn(p, b), GROUPS), vmap_vjps=False)(
                params, batch
            )
            per_layer = per_leaf_grad_abs(grads, params_filter=options["params_filter"])
            losses = fn(params, batch)
            after, _ = balancer.update(losses, with_lambda(balancer, lam_before), stats)
            hat, _ = estimate_only.update(losses, with_lambda(estimate_only, lam_before), stats)
            return stats, per_layer, hat[1], after[1:]

        inputs = [c["inputs"] for c in cases]
        out = jax.jit(jax.vmap(one_case))(
            stacked([case_params(i, dtype) for i in inputs]),
            stacked([case_batch(i, dtype) for i in inputs]),
            jnp.asarray([i["sigma_X"] for i in inputs], dtype),
            jnp.asarray([i["lambda_before"] for i in inputs], dtype),
            jnp.asarray([i["helmholtz_lam"] for i in inputs], dtype),
        )
    stats, per_layer, hat, after = (np.asarray(x, np.float64) for x in out)
    lam_before = np.array([i["lambda_before"] for i in inputs])

    def expected(key: str) -> np.ndarray:
        return np.array([c["expected"][key] for c in cases], np.float64)

    assert options == {"params_filter": "kernels", "mean_over": "leaves"}
    assert per_layer.shape == (len(cases), 2, 4, 2)  # [case, group, weight matrix, (max, mean)]
    np.testing.assert_allclose(per_layer[:, 0, :, 0], expected("max_grad_res_per_layer"), rtol=F32_RTOL)
    np.testing.assert_allclose(
        per_layer[:, 1, :, 1], expected("mean_grad_bcs_unscaled_per_layer"), rtol=F32_RTOL
    )
    # lambda is inside the differentiated boundary loss: the recorded mean is lambda_before times ours.
    np.testing.assert_allclose(
        lam_before[:, None] * per_layer[:, 1, :, 1], expected("mean_grad_bcs_per_layer"), rtol=F32_RTOL
    )
    np.testing.assert_allclose(stats[:, 0, 0], expected("max_grad_res"), rtol=F32_RTOL)
    np.testing.assert_allclose(lam_before * stats[:, 1, 1], expected("mean_grad_bcs"), rtol=F32_RTOL)
    np.testing.assert_allclose(hat, expected("lambda_hat"), rtol=F32_RTOL)
    # lambda_after = 0.9 lambda_before + 0.1 lambda_hat carries a tenth of lambda_hat's error or less.
    np.testing.assert_allclose(after, np.repeat(expected("lambda_after")[:, None], 4, axis=1), rtol=F32_RTOL)


# In the reference's dtype: the float64 recursion is checked on the snapshots above.
@pytest.mark.parametrize("dtype_name", ["float32"])
def test_first_iteration_through_the_train_step(dtype_name: str) -> None:
    """Iteration 0 from the recorded pre-step network: the Adam step with lambda = 1, then the
    statistic after the step on the same batch (the default ``statistic_at="updated"``, with
    ``update_first``), giving lambda for iteration 1.

    TF1's Adam adds its epsilon to ``sqrt(v)`` before the bias correction; on the first step that
    equals optax's form with ``eps = 1e-8 / sqrt(1 - beta2)``.
    """
    (case,) = [c for c in snapshot_cases() if c["inputs"]["iteration"] == 0]
    inputs = case["inputs"]
    first_row = trajectory()["expected"]["per_iteration"]
    with jax.enable_x64(dtype_name == "float64"):
        dtype = jnp.dtype(dtype_name)
        fn = helmholtz_losses(jnp.asarray(inputs["sigma_X"], dtype), inputs["helmholtz_lam"])
        balancer = sj.lr_annealing_balancer(num_losses=5, groups=GROUPS)
        adam = optax.adam(inputs["learning_rate_used_in_step"], eps=1e-8 / np.sqrt(1 - 0.999))
        state = training.BalancedTrainState.create(
            apply_fn=None,
            params=case_params(inputs, dtype, "_before_this_iterations_adam_step"),
            tx=optax.chain(sj.balance(balancer), adam),
        )
        new, metrics = jax.jit(training.make_train_step(fn, balancer=balancer))(
            state, case_batch(inputs, dtype)
        )
    np.testing.assert_array_equal(metrics["weights"], np.ones(5))  # iteration 0 trains with lambda = 1
    want_losses = [first_row["loss_res"][0], *first_row["loss_bc"][0]]
    np.testing.assert_allclose(metrics["losses"], want_losses, rtol=F32_RTOL)
    want_params = jax.tree.leaves(case_params(inputs, np.float64, xp=np))
    for got, want in zip(jax.tree.leaves(new.params), want_params, strict=True):
        # One Adam step moves every entry by about 1e-3; the entries agree to float32 rounding.
        np.testing.assert_allclose(got, want, rtol=F32_RTOL, atol=1e-7)
    np.testing.assert_allclose(new.weights[1:], case["expected"]["lambda_after"], rtol=F32_RTOL)
    assert float(new.weights[0]) == 1.0


def run_recorded_statistics(max_res: np.ndarray, mean_bc: np.ndarray, steps: int) -> tuple[np.ndarray, ...]:
    """The balancer over ``steps`` iterations, fed ``(max_res, mean_bc)`` on iterations 0, 10, ...

    Returns the lambda used in each iteration and the lambda after each one.
    """
    balancer = sj.lr_annealing_balancer(num_losses=5, groups=GROUPS)
    stats = np.zeros((steps, 2, 2))
    due = np.arange(0, steps, 10)
    stats[due, 0, 0] = max_res
    stats[due, 1, 1] = mean_bc
    stats[due, 0, 1] = 1.0  # the reference group's mean does not enter

    def body(state, s):
        used = state.weights[1]
        weights, state = balancer.update(jnp.ones(5), state, s)
        return state, (used, weights[1])

    _, (used, after) = jax.jit(lambda s: jax.lax.scan(body, balancer.init(), s))(jnp.asarray(stats))
    return np.asarray(used), np.asarray(after)[due]


def test_trajectory_from_the_recorded_statistics(x64) -> None:
    """All 101 updates of the 1001-iteration run, from the recorded per-layer statistics reduced
    as our statistic does (max of the layer maxima, plain mean of the unscaled layer means).

    The lambda before each update is our own (the recursion runs freely), and lambda_hat is ours
    (max / (lambda * mean)): the recorded inputs are float32, so our lambda_hat differs from TF's
    by a few float32 ulps, and the lambdas by a tenth of that (F32_RTOL).
    """
    rec = trajectory()["expected"]["recomputes"]
    n = len(rec["it"])
    assert rec["it"] == list(range(0, 10 * n, 10))
    assert rec["lambda_before"][1:] == rec["lambda_after"][:-1]  # the reference chains exactly
    mean_bc = np.mean(np.array(rec["mean_grad_bcs_unscaled_per_layer"]), axis=1)
    used, after = run_recorded_statistics(np.array(rec["max_grad_res"]), mean_bc, 10 * (n - 1) + 1)
    np.testing.assert_allclose(after, rec["lambda_after"], rtol=F32_RTOL)
    rows = trajectory()["expected"]["per_iteration"]
    # Iteration 0 trains with 1; the update after iteration it applies from it + 1 to it + 10.
    np.testing.assert_allclose(used[: len(rows["it"])], rows["lambda_used"], rtol=F32_RTOL)


def test_trajectory_recursion_exact(x64) -> None:
    """The moving average of each of the 101 updates, from the recorded lambda_before.

    The statistic is chosen so that the estimate is the recorded lambda_hat (numerator
    lambda_hat * lambda_before, denominator 1: lambda is inside, so the rule divides by lambda).
    Every lambda_after then matches up to the reference's own rounding: under NumPy 2 (NEP 50) it
    computes ``f32(lambda_hat) * f32(0.1)`` in float32, at most 2^-23 of 0.1 * lambda_hat off.
    """
    rec = trajectory()["expected"]["recomputes"]
    hat, before = np.array(rec["lambda_hat"]), np.array(rec["lambda_before"])
    balancer = sj.lr_annealing_balancer(num_losses=5, groups=GROUPS)

    def one_update(lam: jax.Array, h: jax.Array) -> jax.Array:
        stats = jnp.array([[h * lam, 1.0], [1.0, 1.0]])
        weights, _ = balancer.update(jnp.ones(5), with_lambda(balancer, lam), stats)
        return weights[1]

    after = np.asarray(jax.jit(jax.vmap(one_update))(jnp.asarray(before), jnp.asarray(hat)))
    bound = 0.1 * hat * 2.0**-23 + 1e-14 * after
    assert np.all(np.abs(after - np.array(rec["lambda_after"])) <= bound)
    # beta = 0.9 multiplies the old value (lambda_before = 1 at iteration 0).
    np.testing.assert_allclose(after, 0.9 * before + 0.1 * hat, rtol=1e-14)
