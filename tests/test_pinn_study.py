"""Smoke tests of the main demo, examples/pinn_study.py: every method runs, flags are checked."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

STUDY_PATH = Path(__file__).parents[1] / "examples" / "pinn_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("pinn_study", STUDY_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pinn_study"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_method_runs_a_few_steps_on_burgers(study, tmp_path: Path) -> None:
    # A one-layer network and few points: the smoke test is about wiring, not accuracy.
    results = study.main(
        [
            "--steps",
            "4",
            "--chunk",
            "2",
            "--seeds",
            "2",
            "--hidden",
            "8",
            "--points",
            "64",
            "--out",
            str(tmp_path),
        ]
    )
    rows = results["burgers"]
    assert [r.name for r in rows] == list(study.method_registry())
    for r in rows:
        assert r.errors.shape == (2,) and np.all(np.isfinite(r.errors)), r.name
        assert r.losses.shape == (2, 4, 4) and r.weights.shape == (2, 4, 4), r.name
        assert np.all(np.isfinite(r.weights)), r.name
    table = (tmp_path / "pinn_burgers_results.md").read_text()
    for name in study.method_registry():
        assert f"| {name} |" in table
    summary = json.loads((tmp_path / "pinn_burgers_results.json").read_text())
    assert set(summary) == set(study.method_registry())
    assert (tmp_path / "pinn_burgers_training.png").stat().st_size > 10_000
    assert (tmp_path / "pinn_burgers_solution.png").stat().st_size > 10_000


def test_helmholtz_runs(study, tmp_path: Path) -> None:
    results = study.main(
        [
            "--problem",
            "helmholtz",
            "--methods",
            "fixed,relobralo",
            "--steps",
            "2",
            "--chunk",
            "1",
            "--seeds",
            "1",
            "--hidden",
            "8",
            "--points",
            "64",
            "--no-plots",
            "--out",
            str(tmp_path),
        ]
    )
    assert [r.name for r in results["helmholtz"]] == ["fixed", "relobralo"]
    assert results["helmholtz"][0].weights.shape == (1, 2, 5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--problem", "heat"], "--problem 'heat' is not one of"),
        (["--methods", "fixed,magic"], "unknown ['magic']"),
        (["--methods", ","], "unknown (empty)"),
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--steps", "150"], "--steps must be a positive multiple of --chunk=100, got 150"),
        (["--chunk", "0"], "--chunk must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
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


def test_list_methods(study, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        study.parse_args(["--list-methods"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.split() == list(study.method_registry())
