"""Float32 accuracy of the solver-based aggregators (UPGrad, DualProj, CAGrad).

torchjd solves its K x K problems in float64 even for float32 inputs; our solvers run in
the input's dtype, so they must be as accurate as float32 allows. The recorded torchjd
cases of kinds "gaussian" and "scales" (rows of very different norms, where the previous
solvers lost digits) are cast to float32 and compared with (a) our own float64 result on
the same float32-rounded Jacobian, which isolates the solver's float32 arithmetic, and
(b) the recorded float64 reference. Each group of one K is one jit of a vmapped update.
Nash-MTL's float32 form is checked on its own cases in test_parity_aggregators_stateful.py
(a vmapped batch of its nested solver loops is too slow to compile here).
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_array

from softadapt_jax.gradients.aggregators.cagrad import cagrad
from softadapt_jax.gradients.aggregators.dual_proj import dual_proj
from softadapt_jax.gradients.aggregators.upgrad import upgrad

DATA = pathlib.Path(__file__).parent / "data" / "torchjd_aggregators.json"
KINDS = ("gaussian", "scales")

# (a) float32 against our float64 on the same input: the problems here are well conditioned
# (cond of the active K x K blocks well below 1e2), so a backward-stable float32 solve lands
# within a few hundred float32 epsilons (1.2e-7) of the float64 one; 1e-5 is that bound.
# The previous solvers missed it by orders of magnitude on the "scales" cases.
OWN_RTOL = 1e-5
# (b) against the recorded float64 reference: the same bound plus the reference's own solver
# accuracy (quadprog: exact; Nash-MTL's ECOS and CAGrad's CLARABEL stop at relative gaps of
# about 1e-8, which moves the weights by up to 1e-4, the tolerance of the float64 parity tests).
REF_RTOL = {"UPGrad": 1e-5, "DualProj": 1e-5, "CAGrad": 1e-3}

AGGREGATORS = {
    "UPGrad": upgrad(),
    "DualProj": dual_proj(),
    "CAGrad": cagrad(c=0.5),
}


@functools.cache
def _groups(method: str) -> dict[tuple[int, bool], tuple[np.ndarray, np.ndarray]]:
    """The usable cases of ``method``, ``(J [B, K, n], update [B, n])`` in float64, by K and K > n.

    Within a group the Jacobians are padded with zero columns to the widest one: a zero column
    leaves the Gramian, and so every weight, unchanged and gets a zero update entry, so one
    compiled solver serves every n (the recorded shapes would otherwise need one compile each).
    The padded update entries are compared too; they must come out zero.
    """
    groups: dict[tuple[int, bool], list[Any]] = {}
    for case in json.loads(DATA.read_text())["methods"][method]["cases"]:
        if case["kind"] not in KINDS or "J" not in case["inputs"]:
            continue
        statuses = case["expected"].get("solver_statuses", [])
        if any(s != "optimal" for s in statuses):  # a failed reference solve is no reference
            continue
        j = reference_array(case["inputs"]["J"])
        k, n = j.shape
        groups.setdefault((k, k > n), []).append((j, reference_array(case["expected"]["update"])))
    out = {}
    for key, cs in groups.items():
        width = max(j.shape[1] for j, _ in cs)
        js = np.stack([np.pad(j, ((0, 0), (0, width - j.shape[1]))) for j, _ in cs])
        us = np.stack([np.pad(u, (0, width - u.shape[0])) for _, u in cs])
        out[key] = (js, us)
    return out


def _batched_update(method: str):
    agg = AGGREGATORS[method]
    return jax.jit(jax.vmap(lambda j: agg.update(j, agg.init(j.shape[0], j.shape[1], j.dtype))[0]))


def _relative(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Row-wise ``||x - ref|| / ||ref||``; the plain norm where ``ref`` is zero (CAGrad, stationary)."""
    scale = np.linalg.norm(ref, axis=1)
    return np.linalg.norm(x - ref, axis=1) / np.where(scale > 0, scale, 1.0)


def _check(method: str, groups: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray]]) -> None:
    update = _batched_update(method)
    for (k, _), (js, want) in groups.items():
        n = js.shape[2]
        j32 = jnp.asarray(js, jnp.float32)
        ours32 = np.asarray(update(j32), np.float64)
        assert np.all(np.isfinite(ours32)), (method, k, n)
        with jax.enable_x64(True):
            ours64 = np.asarray(update(jnp.asarray(np.asarray(j32), jnp.float64)))
        own = _relative(ours32, ours64)
        ref = _relative(ours32, want)
        assert np.all(own <= OWN_RTOL), (method, k, n, own.max())
        assert np.all(ref <= REF_RTOL[method]), (method, k, n, ref.max())


def _wide(groups: dict, wide: bool) -> dict:
    """The groups with K > n (a singular Gramian) if ``wide``, else those with K <= n."""
    return {key: g for key, g in groups.items() if key[1] == wide}


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_float32_matches_float64(method: str) -> None:
    groups = _groups(method) if method != "CAGrad" else _wide(_groups(method), False)
    assert sum(len(js) for js, _ in groups.values()) >= 5, method  # enough recorded cases
    _check(method, groups)


@pytest.mark.xfail(
    strict=True,
    reason="CAGrad with K > n (singular Gramian): the float32 face polish is rejected and the "
    "barrier's point is 2e-3 from the float64 one (open defect)",
)
def test_cagrad_float32_with_more_tasks_than_dimensions() -> None:
    groups = _wide(_groups("CAGrad"), True)
    assert groups
    _check("CAGrad", groups)
