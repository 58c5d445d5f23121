"""Shared pytest configuration: 4 simulated CPU devices, a headless matplotlib, float64 on demand.

The environment variables are set before anything imports JAX or matplotlib, so that every test
module (some use ``jax.pmap`` over 4 CPU devices) sees the same configuration.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("MPLBACKEND", "Agg")

import functools
import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np
import pytest

# The PINN problems live with the study (examples/problems); the tests import them as `problems`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

REFERENCE_PATH = pathlib.Path(__file__).parent / "data" / "softadapt_reference_public.json"


@functools.lru_cache(maxsize=1)
def load_reference() -> dict[str, Any]:
    """The reference cases computed with the original PyTorch SoftAdapt (parsed once)."""
    return json.loads(REFERENCE_PATH.read_text())


@pytest.fixture(scope="session")
def reference_data() -> dict[str, Any]:
    """The parsed ``tests/data/softadapt_reference_public.json``."""
    return load_reference()


# How the reference JSON files spell the non-finite floats (JSON has no literal for them).
_SPECIAL_FLOATS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def decode_special(x: Any) -> Any:
    """A reference JSON value with "NaN", "Infinity" and "-Infinity" read as floats.

    Lists and dicts are decoded recursively; other strings are kept.
    """
    if isinstance(x, str):
        return _SPECIAL_FLOATS.get(x, x)
    if isinstance(x, list):
        return [decode_special(v) for v in x]
    if isinstance(x, dict):
        return {k: decode_special(v) for k, v in x.items()}
    return x


def reference_array(x: Any) -> np.ndarray:
    """A reference JSON array (nested lists, non-finite values as strings) as float64."""
    return np.array(decode_special(x), np.float64)


@pytest.fixture
def x64():
    """Enables 64-bit floats for one test and restores the previous setting afterwards."""
    with jax.enable_x64(True):
        yield


# The modules that take longest, longest first. pytest-xdist deals whole modules to the two
# workers in collection order (pyproject: --dist loadfile --no-loadscope-reorder), so dealing the
# long ones first lets both workers finish together instead of one running a long module alone at
# the end. A module missing here only costs balance, never correctness.
LONGEST_FIRST = (
    "test_contract_gradients.py",
    "test_parity_aggregators_stateful.py",
    "test_gradient_weighting.py",
    "test_parity.py",
    "test_rotograd.py",
    "test_pinn_study.py",
    "test_fuzz.py",
    "test_gradients.py",
    "test_problems.py",
    "test_float32_aggregators.py",
    "test_parity_libmtl_gradients.py",
    "test_parity_aggregators_projection.py",
    "test_weights.py",
    "test_parity_aggregators_gramian.py",
    "test_training.py",
    "test_contract.py",
    "test_safety.py",
    "test_gradient_overflow.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected
