"""Causal residual weighting against jaxpi (tests/data/jaxpi_weighting.json), float64, and properties.

jaxpi @ e85b694 (``examples/burgers/models.py``: ``res_and_w``, ``losses``, ``compute_diag_ntk``)
recorded, for its Burgers example with causal weighting (``burgers_causal_fancy``: tol 1, 4
chunks, batch 64), the causal residual loss ``losses.res`` at 6 checkpoints, its gradient
``grads_flat.res`` (the 3 grad_norm cases) and the per-chunk residual NTK times the causal weights
``ntk_diag.res`` (the 3 ntk cases). The network is rebuilt from the recorded parameters with the
helpers of tests/test_parity_jaxpi.py; the residuals at the time-sorted batch go through
:func:`causal_residual_loss` and :func:`causal_weights`. The 6 cases share their shapes and are
vmapped under one jit. Same algorithm in float64: the loss at ``rtol=1e-10`` (what the rebuild
reaches, as in test_parity_jaxpi.py), gradients and NTK at ``rtol=1e-6``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_parity_jaxpi import as_params, cases, mlp_apply, reference, stacked

from softadapt_jax.causal import (
    TIME_SORT_CONVENTIONS,
    causal_chunk_losses,
    causal_converged,
    causal_residual_loss,
    causal_weights,
    time_sorted,
)

PROBLEM = "burgers_causal_fancy"


def _residual_fn(problem: dict):
    """jaxpi's Burgers residual ``u_t + u u_x - 0.01/pi u_xx`` of the rebuilt network at one point."""
    apply = mlp_apply(problem["arch"])

    def u(p, t, x):
        return apply(p, jnp.stack([t, x]))[0]

    def r(p, t, x):
        u_t = jax.jvp(lambda s: u(p, s, x), (t,), (1.0,))[1]
        (u_val, u_x), (_, u_xx) = jax.jvp(lambda y: jax.jvp(lambda z: u(p, t, z), (y,), (1.0,)), (x,), (1.0,))
        return u_t + u_val * u_x - 0.01 / jnp.pi * u_xx

    return r


def test_burgers_causal_loss_gradient_and_ntk(x64) -> None:
    problem = reference()["problems"][PROBLEM]
    cfg = problem["weighting"]
    assert cfg["use_causal"] and cfg["num_chunks"] == 4 and cfg["causal_tol"] == 1.0
    grad_cases, ntk_cases = cases("grad_norm", PROBLEM), cases("ntk", PROBLEM)
    cs = grad_cases + ntk_cases
    assert len(grad_cases) == 3 and len(ntk_cases) == 3
    r = _residual_fn(problem)
    m, tol = cfg["num_chunks"], jnp.asarray(cfg["causal_tol"])

    def one(params, batch):
        points = time_sorted(batch)  # jaxpi: the time column sorted on its own

        def loss(p):
            res = jax.vmap(r, (None, 0, 0))(p, points[:, 0], points[:, 1])
            return causal_residual_loss(res, m, tol, return_weights=True)

        (value, weights), grad = jax.value_and_grad(loss, has_aux=True)(params)
        # Per-point NTK diagonal ||dr_i/dtheta||^2, averaged per chunk, times the causal weights.
        per_point = jax.vmap(lambda t, x: ravel_pytree(jax.grad(r)(params, t, x))[0])(
            points[:, 0], points[:, 1]
        )
        ntk = jnp.mean(jnp.sum(per_point**2, axis=1).reshape(m, -1), axis=1)
        return value, ravel_pytree(grad)[0], ntk * weights

    arch = problem["arch"]
    params = stacked([as_params(c["inputs"]["params"], arch) for c in cs])
    batch = jnp.asarray(np.stack([c["inputs"]["batch"] for c in cs]))
    value, grad, ntk = jax.jit(jax.vmap(one))(params, batch)

    np.testing.assert_allclose(value, [c["expected"]["losses"]["res"] for c in cs], rtol=1e-10)
    np.testing.assert_allclose(
        grad[:3], [c["expected"]["grads_flat"]["res"] for c in grad_cases], rtol=1e-6, atol=1e-12
    )
    np.testing.assert_allclose(ntk[3:], [c["expected"]["ntk_diag"]["res"] for c in ntk_cases], rtol=1e-6)


# --- the formulas by hand ------------------------------------------------------------------------------


def test_weights_and_loss_by_hand() -> None:
    chunk = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(causal_weights(chunk, 0.5), np.exp([-0.0, -0.5, -1.5]), rtol=1e-6)
    # 6 time-ordered points, 3 chunks of 2: chunk losses mean(r^2) = [2.5, 0.5, 8].
    res = jnp.array([1.0, 2.0, 1.0, 0.0, 2.0, -2.0 * np.sqrt(3.0)])
    chunk_losses = np.array([2.5, 0.5, 8.0])
    np.testing.assert_allclose(causal_chunk_losses(res, 3), chunk_losses, rtol=1e-6)
    w = np.exp(-2.0 * np.array([0.0, 2.5, 3.0]))
    loss, weights = causal_residual_loss(res, 3, 2.0, return_weights=True)
    np.testing.assert_allclose(weights, w, rtol=1e-6)
    np.testing.assert_allclose(loss, np.mean(w * chunk_losses), rtol=1e-6)
    np.testing.assert_allclose(causal_residual_loss(res, 3, 0.0), np.mean(res**2), rtol=1e-6)


def test_weights_are_constants_for_the_gradient() -> None:
    res = jnp.array([1.0, -2.0, 0.5, 3.0])
    w = causal_weights(causal_chunk_losses(res, 2), 1.0)
    # d/dr_p of (1/M) sum_i w_i mean_chunk(r^2) with w held: w_{i(p)} 2 r_p / (M n).
    expected = np.repeat(np.asarray(w), 2) * 2.0 * np.asarray(res) / 4.0
    np.testing.assert_allclose(jax.grad(lambda z: causal_residual_loss(z, 2, 1.0))(res), expected, rtol=1e-6)


def test_fields_tol_sweep_jit_and_vmap() -> None:
    rng = np.random.default_rng(0)
    res = jnp.asarray(rng.normal(size=(2, 12)))
    tol = jnp.array([0.1, 3.0])
    tols = jnp.array([0.0, 0.5, 2.0, 10.0])

    @jax.jit
    def run(res, tol, tols):
        loss = functools.partial(causal_residual_loss, num_chunks=4)
        return (
            loss(res, tol=tol),  # leading axes: independent fields, each with its own tol
            jnp.stack([loss(res[f], tol=tol[f]) for f in range(2)]),
            jax.vmap(lambda t: loss(res[0], tol=t))(tols),  # a sweep over tol
            jnp.stack([loss(res[0], tol=t) for t in tols]),
            causal_weights(causal_chunk_losses(res, 4), 1.0),
        )

    both, per_field, swept, looped, w = run(res, tol, tols)
    np.testing.assert_allclose(both, per_field, rtol=1e-6)
    np.testing.assert_allclose(swept, looped, rtol=1e-6)
    assert np.all(np.diff(np.asarray(swept)) <= 0)  # a larger tol never raises the loss
    assert np.all(np.diff(np.asarray(w), axis=-1) <= 0) and np.all(np.asarray(w[..., 0]) == 1.0)


def test_nonfinite_residual_gives_nonfinite_loss() -> None:
    res = jnp.array([1.0, jnp.nan, 0.5, 0.2])
    assert not np.isfinite(float(causal_residual_loss(res, 2, 1.0)))
    res = jnp.array([1.0, 0.5, jnp.inf, 0.2])
    assert not np.isfinite(float(causal_residual_loss(res, 2, 1.0)))


@pytest.mark.parametrize("convention", TIME_SORT_CONVENTIONS)
def test_time_sorted(convention: str) -> None:
    pts = jnp.array([[0.5, 10.0], [0.125, 20.0], [0.75, 30.0], [0.25, 40.0]])
    out = jax.jit(lambda p: time_sorted(p, convention=convention))(pts)
    np.testing.assert_array_equal(out[:, 0], [0.125, 0.25, 0.5, 0.75])
    if convention == "jaxpi":
        np.testing.assert_array_equal(out[:, 1], pts[:, 1])  # the other columns are left as sampled
    else:
        np.testing.assert_array_equal(out[:, 1], [20.0, 40.0, 10.0, 30.0])  # each point kept whole
    np.testing.assert_array_equal(time_sorted(pts[:, ::-1], 1, convention=convention)[:, 1], out[:, 0])


def test_converged() -> None:
    w = jnp.array([[1.0, 0.995, 0.992], [1.0, 0.9, 0.5]])
    np.testing.assert_array_equal(causal_converged(w), [True, False])
    np.testing.assert_array_equal(causal_converged(w, 0.4), [True, True])


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"`num_chunks`=4 must divide .* N=6"):
        causal_residual_loss(jnp.ones(6), 4, 1.0)
    with pytest.raises(ValueError, match="`num_chunks` must be an integer >= 1"):
        causal_chunk_losses(jnp.ones(6), 0)
    with pytest.raises(ValueError, match="`residuals` must have a trailing point axis"):
        causal_chunk_losses(jnp.float32(1.0), 1)
    with pytest.raises(ValueError, match="`chunk_losses` must have a trailing chunk axis"):
        causal_weights(jnp.float32(1.0), 1.0)
    with pytest.raises(ValueError, match="`tol` of shape \\(3,\\) does not broadcast"):
        causal_weights(jnp.ones((2, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match="`return_weights` must be a bool"):
        causal_residual_loss(jnp.ones(4), 2, 1.0, return_weights=1)
    with pytest.raises(ValueError, match="`convention` must be one of"):
        time_sorted(jnp.ones((3, 2)), convention="pairs")
    with pytest.raises(ValueError, match="`points` must be \\[N, d\\]"):
        time_sorted(jnp.ones(3))
    with pytest.raises(ValueError, match="`time_index` must be an int column index in \\[0, 2\\)"):
        time_sorted(jnp.ones((3, 2)), 2)
    with pytest.raises(ValueError, match="`delta` must be a float in \\(0, 1\\)"):
        causal_converged(jnp.ones(3), 1.0)
