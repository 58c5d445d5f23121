"""Smoke tests of the main demo, examples/pinn_study.py: wiring, statistics, schedule and flags.

Tiny networks and a few steps: these tests are about the study's machinery, not accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softadapt_jax as sj
from softadapt_jax import training
from problems import get_problem
from softadapt_jax.statistics import statistic_shape

STUDY_PATH = Path(__file__).parents[1] / "examples" / "pinn_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("pinn_study", STUDY_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pinn_study"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_demo_set_up_runs_grouped_with_fresh_points(study, tmp_path: Path) -> None:
    # The default set-up (the authors' Helmholtz, K = 2 groups) with a tiny budget; plots on.
    # Chunks of 2 steps: one compiled program per method (lr_annealing recomputes at step 0).
    argv = ["--steps", "2", "--chunk", "2", "--seeds", "2", "--methods", "fixed,lr_annealing"]
    argv += ["--hidden", "4", "--points", "16", "--out", str(tmp_path)]
    results = study.main(argv)["helmholtz_wang2021"]
    assert [r.name for r in results] == ["fixed", "lr_annealing"]
    for r in results:
        assert r.errors.shape == (2,) and np.all(np.isfinite(r.errors)), r.name
        assert r.losses.shape == (2, 2, 5) and r.weights.shape == (2, 2, 5), r.name
        # The four edges share one weight.
        np.testing.assert_array_equal(r.weights[..., 1:], np.repeat(r.weights[..., 1:2], 4, axis=-1))
        # Error curve: the initial error, then after each chunk.
        np.testing.assert_array_equal(r.curve_steps, [0, 2])
        np.testing.assert_array_equal(r.error_curve[:, -1], r.errors)
    fixed, annealing = results
    np.testing.assert_array_equal(fixed.weights, 1.0)
    # lr_annealing recomputed at step 0: step 1 trains with a new boundary weight.
    assert np.all(annealing.weights[:, 0] == 1.0) and np.all(annealing.weights[:, 1, 1:] != 1.0)
    # Same seeds, same initial networks: the initial errors are paired.
    np.testing.assert_array_equal(fixed.error_curve[:, 0], annealing.error_curve[:, 0])
    table = (tmp_path / "pinn_helmholtz_wang2021_results.md").read_text()
    assert "| fixed |" in table and "| lr_annealing |" in table and "baseline" in table
    assert "2 weights, groups (0, 1, 1, 1, 1)" in table and "fresh points every step" in table
    summary = json.loads((tmp_path / "pinn_helmholtz_wang2021_results.json").read_text())
    assert set(summary["methods"]) == {"fixed", "lr_annealing"}
    assert summary["methods"]["lr_annealing"]["vs_fixed"]["verdict"] in {
        "better",
        "worse",
        "no clear difference",
    }
    for figure in ("error_curve", "training", "solution"):
        assert (tmp_path / f"pinn_helmholtz_wang2021_{figure}.png").stat().st_size > 10_000, figure


def test_optimizer_decays_continuously_and_set_ups_describe_themselves(study) -> None:
    args = study.parse_args(["--setup", "wang2021", "--decay-rate", "0.5", "--decay-steps", "2"])
    tx = study.make_optimizer(args)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    rates = []
    for _ in range(4):
        # Constant unit gradients: each Adam update is -lr_t (to float32 rounding and eps).
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        rates.append(-float(updates["w"]))
    # Continuous decay (tf.train.exponential_decay, staircase=False): 1e-3 * 0.5 ** (t / 2);
    # a staircase would give 1e-3, 1e-3, 5e-4, 5e-4. rtol 1e-4: Adam's bias corrections in
    # float32 move the unit ratio m_hat / sqrt(v_hat) by ~1e-5.
    np.testing.assert_allclose(rates, 1e-3 * 0.5 ** (np.arange(4) / 2), rtol=1e-4)
    assert study.make_optimizer(study.parse_args(["--setup", "legacy"])) is not None
    legacy = study.parse_args(["--setup", "legacy"])
    assert legacy.decay_rate == 1.0 and legacy.resample is False and legacy.groups == "none"
    assert study.problem_options(legacy) == {
        "hidden": (64, 64, 64),
        "num_residual": 1024,
        "resample": False,
    }
    problem = get_problem("burgers", hidden=(4,), **{"resample": False})
    text = study.describe(problem, legacy)
    assert "4 weights" in text and "one fixed set of points" in text and "constant" in text


def test_every_registered_method_builds_and_updates(study) -> None:
    # Each balancer of the registry, grouped as in the demo, one jitted update on a loss vector
    # (with a gradient statistic where the method needs one); the training wiring is covered
    # by the run above and the schedule test below.
    groups = (0, 1, 1, 1, 1)
    for name, factory in study.method_registry().items():
        balancer = factory(5, groups)
        state = balancer.init()
        losses = jnp.array([100.0, 1.0, 2.0, 3.0, 4.0])
        if balancer.statistic is None:
            weights, state = jax.jit(balancer.update)(losses, state)
        else:
            shape = statistic_shape(balancer.statistic, 2)
            weights, state = jax.jit(balancer.update)(losses, state, jnp.ones(shape))
        assert weights.shape == (5,) and np.all(np.isfinite(weights)), name
        assert np.all(np.asarray(weights[1:]) == np.asarray(weights[1])), name


def test_static_schedule_matches_the_cond_step(study, x64) -> None:
    # The study lays the statistic steps out statically; a scan of the library's lax.cond step
    # (which decides on the device) must give the same weights, losses and parameters.
    problem = get_problem(
        "burgers", hidden=(4,), num_residual=16, num_initial=8, num_boundary=8, resample=True
    )
    balancer = sj.lr_annealing_balancer(num_losses=4, groups=(0, 1, 1, 1))
    tx = optax.chain(sj.balance(balancer), optax.adam(1e-2))
    key_params, key_points = jax.random.split(jax.random.PRNGKey(0))
    state = training.BalancedTrainState.create(
        apply_fn=problem.predict, params=problem.init_params(key_params), tx=tx
    )
    carry = (state, problem.init_points(key_points))
    n = study._statistic_schedule(balancer)[0]
    # From step 0 (whole blocks, then a tail), then from mid-block (a lead, no whole block, a tail).
    first, second = 2 * n + 5, n + 2
    seg1 = jax.jit(study.make_segment(problem, balancer, 0, first))
    seg2 = jax.jit(study.make_segment(problem, balancer, first % n, second))
    cond_step = training.make_train_step(
        problem.loss_components, balancer=balancer, residuals_fn=problem.residuals
    )

    @jax.jit
    def reference(c):
        def body(c, _):
            s, stream = c
            batch, stream = problem.next_points(stream)
            s, m = cond_step(s, batch)
            return (s, stream), (m["losses"], m["weights"])

        return jax.lax.scan(body, c, None, length=first + second)

    (ref_state, _), (ref_losses, ref_weights) = reference(carry)
    c, losses1, weights1 = seg1(carry)
    (got_state, _), losses2, weights2 = seg2(c)
    weights = np.concatenate([weights1, weights2])
    assert len(np.unique(np.asarray(ref_weights[:, 1]))) > 2  # the boundary weight does move
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-9)
    np.testing.assert_allclose(np.concatenate([losses1, losses2]), ref_losses, rtol=1e-9)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_paired_ratio_t_interval_and_verdicts(study) -> None:
    base = np.array([0.2, 0.4, 0.8])
    # log ratios -1, -2, -3: mean -2, sample sd 1, t_{0.975, 2} = 4.302653 (scipy).
    pr = study.paired_ratio(base * np.exp([-1.0, -2.0, -3.0]), base)
    half = 4.302652729911275 / np.sqrt(3)
    assert pr.ratio == pytest.approx(np.exp(-2.0), rel=1e-12)
    assert (pr.low, pr.high) == pytest.approx((np.exp(-2 - half), np.exp(-2 + half)), rel=1e-9)
    assert pr.verdict == "no clear difference"
    assert study.paired_ratio(base * [0.5, 0.45, 0.55], base).verdict == "better"
    assert study.paired_ratio(base * [2.0, 2.1, 1.9], base).verdict == "worse"
    assert study.paired_ratio(base * 3, base).verdict == "worse"  # zero spread, interval [3, 3]
    assert study.paired_ratio(np.array([0.1, np.nan, 0.1]), base).verdict == "diverged"
    single = study.paired_ratio(np.array([0.1]), np.array([0.2]))
    assert single.ratio == pytest.approx(0.5) and single.verdict == "n/a" and np.isnan(single.low)
    assert study.geometric_mean(np.array([1.0, 4.0])) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--problem", "heat"], "--problem 'heat' is not one of"),
        (["--setup", "magic"], "invalid choice: 'magic'"),
        (["--methods", "fixed,magic"], "unknown ['magic']"),
        (["--methods", ","], "unknown (empty)"),
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--chunk", "0"], "--chunk must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--decay-rate", "1.5"], "--decay-rate must be in (0, 1], got 1.5"),
        (["--decay-steps", "0"], "--decay-steps must be >= 1, got 0"),
        (["--groups", "some"], "invalid choice: 'some'"),
        (["--hidden", "64,x"], "--hidden must be comma-separated integers"),
        (["--hidden", "0"], "--hidden widths must be >= 1"),
        (["--points", "0"], "--points must be >= 1"),
    ],
)
def test_bad_flags_get_a_clear_message(study, argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        study.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_set_ups_set_the_defaults_and_help_shows_them(study, capsys) -> None:
    args = study.parse_args([])
    assert (args.setup, args.problems, args.steps, args.groups) == (
        "demo",
        ["helmholtz_wang2021"],
        8000,
        "problem",
    )
    assert args.method_names == ["fixed", "lr_annealing"]
    full = study.parse_args(["--setup", "wang2021"])
    assert full.steps == 40_001 and full.method_names == list(study.method_registry())
    assert (full.lr, full.decay_rate, full.decay_steps) == (1e-3, 0.9, 1000)
    assert study.parse_args(["--setup", "wang2021", "--steps", "7"]).steps == 7  # flags override
    library = study.parse_args(["--setup", "library"])
    assert library.problems == ["burgers", "helmholtz"] and library.resample is True
    with pytest.raises(SystemExit):
        study.parse_args(["--setup", "wang2021", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrap argparse's lines
    assert "(default: 40001)" in text and "(default: helmholtz_wang2021)" in text


def test_list_methods(study, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        study.parse_args(["--list-methods"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.split() == list(study.method_registry())


def _summary(description: str, methods: dict[str, list[float]]) -> dict:
    entry = {"step_time_ms": 1.0, "train_s": 2.0, "compile_s": 3.0, "curve_steps": [0, 10]}
    return {
        "command": "python examples/pinn_study.py",
        "description": description,
        "wall_s": 5.0,
        "methods": {
            name: {**entry, "errors": errors, "error_curve": [[1.0, e] for e in errors]}
            for name, errors in methods.items()
        },
    }


def test_merge_joins_batches_pairs_with_fixed_and_checks_them(study, tmp_path: Path) -> None:
    a, b, c, d = (tmp_path / f"{n}_results.json" for n in "abcd")
    a.write_text(json.dumps(_summary("set-up: x", {"fixed": [0.2, 0.4], "dwa": [0.1, 0.2]})))
    b.write_text(json.dumps(_summary("set-up: x", {"fixed": [0.2, 0.4], "ntk": [0.4, 0.8]})))
    merged = study.main(["--merge", str(a), str(b), "--out", str(tmp_path / "out"), "--no-plots"])["merged"]
    assert [r.name for r in merged] == ["fixed", "dwa", "ntk"]
    table = (tmp_path / "out" / "a_merged.md").read_text()
    assert "| dwa | 0.1, 0.2 | 1.414e-01 | 0.5× [0.5, 0.5] | better |" in table
    assert "| ntk | 0.4, 0.8 | 5.657e-01 | 2× [2, 2] | worse |" in table
    c.write_text(json.dumps(_summary("set-up: x", {"fixed": [0.3, 0.4]})))
    with pytest.raises(ValueError, match="fixed weights differ between files"):
        study.merge_results([a, c], tmp_path, plots=False)
    d.write_text(json.dumps(_summary("set-up: y", {"fixed": [0.2, 0.4]})))
    with pytest.raises(ValueError, match="the files describe different set-ups"):
        study.merge_results([a, d], tmp_path, plots=False)
