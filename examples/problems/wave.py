"""1-D wave equation of the NTK paper (Wang, Yu & Perdikaris 2022): the PINN problem.

    u_tt = c² u_xx,   x in [0, 1], t in [0, 1],   c = 2,
    u(x, 0) = sin(pi x) + a sin(4 pi x),   u_t(x, 0) = 0,   u(0, t) = u(1, t) = 0,
    u(x, t) = sin(pi x) cos(2 pi t) + a sin(4 pi x) cos(8 pi t),   a = 1/2.

Unlike Burgers and Helmholtz, a second-order-in-time hyperbolic problem with a
derivative condition: the five loss components are the residual, the initial
displacement, the two boundaries and the initial velocity ``u_t(x, 0)``. The NTK
authors weight the residual, the displacement-type terms (initial and boundary) and
the velocity term separately (``term_groups``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from problems.common import (
    Array,
    Batch,
    Moments,
    Params,
    Problem,
    init_mlp,
    input_moments,
    mlp_apply,
    reference_error_fn,
    sample_boxes,
    standardize,
)

COMPONENT_NAMES: tuple[str, ...] = ("residual", "initial", "left", "right", "velocity")
# PINNsNTK (PINNsNTK_Wave1D.ipynb): lam_r on the residual, lam_u on the initial and boundary
# displacement errors together, lam_ut on the initial velocity.
NTK_GROUPS: tuple[int, ...] = (0, 1, 1, 1, 2)
WAVE_SPEED: float = 2.0
# The NTK paper's network is [2, 500, 500, 500, 1]; 64 wide keeps a CPU step ~60x cheaper.
DEFAULT_WAVE_HIDDEN: tuple[int, ...] = (64, 64, 64)


def wave_exact(x: Array, t: Array, a: float = 0.5) -> Array:
    """Exact solution ``sin(pi x) cos(2 pi t) + a sin(4 pi x) cos(8 pi t)``; NumPy or JAX, broadcasting.

    Both modes travel at ``c = 2`` only because their frequencies are in the ratio of
    ``c``: the solution is exact for this wave speed.
    """
    xp = jnp if isinstance(x, jax.Array) or isinstance(t, jax.Array) else np
    return xp.sin(np.pi * x) * xp.cos(2 * np.pi * t) + a * xp.sin(4 * np.pi * x) * xp.cos(8 * np.pi * t)


def _net(params: Params, x: Array, t: Array, moments: Moments | None) -> Array:
    """Network output ``u [N]`` at ``x [N]``, ``t [N]``."""
    inputs = jnp.stack([x, t], axis=-1)
    # Without standardisation, map [0, 1]² to [-1, 1]², the scale tanh layers expect.
    inputs = 2.0 * inputs - 1.0 if moments is None else standardize(inputs, moments)
    return mlp_apply(params, inputs)[:, 0]


def wave_residual(params: Params, points: Array, *, moments: Moments | None = None) -> Array:
    """PDE residual ``u_tt - c² u_xx`` (``c = 2``) of the network at each point.

    Per-point second derivatives by nested batched ``jax.jvp`` (the network maps rows
    independently), with respect to the raw coordinates.

    Args:
      params: network parameters.
      points: ``[N, 2]`` columns ``(x, t)``.
      moments: optional ``(mean [2], std [2])`` of the input standardisation.

    Returns:
      ``[N]``.
    """
    x, t = points[:, 0], points[:, 1]
    ones = jnp.ones_like(x)

    def u_x(x_: Array) -> Array:
        return jax.jvp(lambda xx: _net(params, xx, t, moments), (x_,), (ones,))[1]

    def u_t(t_: Array) -> Array:
        return jax.jvp(lambda tt: _net(params, x, tt, moments), (t_,), (ones,))[1]

    u_xx = jax.jvp(u_x, (x,), (ones,))[1]
    u_tt = jax.jvp(u_t, (t,), (ones,))[1]
    return u_tt - WAVE_SPEED**2 * u_xx


def wave_velocity(params: Params, points: Array, *, moments: Moments | None = None) -> Array:
    """``u_t`` of the network at each point ``[N, 2]`` (columns ``(x, t)``); returns ``[N]``."""
    x, t = points[:, 0], points[:, 1]
    return jax.jvp(lambda tt: _net(params, x, tt, moments), (t,), (jnp.ones_like(t),))[1]


def wave_problem(
    *,
    hidden: Sequence[int] = DEFAULT_WAVE_HIDDEN,
    num_residual: int = 300,
    num_initial: int = 100,
    num_boundary: int = 100,
    amplitude: float = 0.5,
    reference_shape: tuple[int, int] = (200, 200),
    resample: bool = True,
    standardize_inputs: bool = True,
    term_groups: Sequence[int] | None = NTK_GROUPS,
) -> Problem:
    """The wave PINN problem (K = 5: residual, initial, left, right, velocity).

    Defaults follow the NTK authors' notebook (PredictiveIntelligenceLab/PINNsNTK,
    ``PINNsNTK_Wave1D.ipynb``): 300 residual points and 100 points for each of the
    initial displacement, the two boundaries and the initial velocity, drawn afresh
    every step; inputs standardised by the moments of 100,000 uniform points; a 200 x
    200 test grid. Deliberate difference: the network is narrower (default
    ``(64, 64, 64)`` against their 500 wide), so that a run fits a CPU budget. The
    authors train with Adam, ``1e-3 * 0.9 ** (step / 1000)``, for 80,001 steps.

    Args:
      hidden: hidden-layer widths of the tanh MLP.
      num_residual: interior points, uniform on ``[0, 1]²``.
      num_initial: points at ``t = 0`` for the displacement, and as many again for the
        velocity (drawn separately).
      num_boundary: points on each of ``x = 0`` and ``x = 1``, ``t`` uniform.
      amplitude: ``a``, the weight of the fast mode.
      reference_shape: ``(nx, nt)`` of the ``linspace(0, 1, n)`` reference grid.
      resample: training draws fresh points every step (:meth:`Problem.next_points`).
      standardize_inputs: feed the network ``(X - mean) / std`` (:func:`input_moments`);
        otherwise ``2 X - 1``.
      term_groups: the grouping recorded as ``Problem.term_groups`` (default: the NTK
        authors' three weights).

    Returns:
      A :class:`Problem`. Its batch maps each of ``COMPONENT_NAMES`` to points
      ``[N, 2]`` with columns ``(x, t)``.
    """
    hidden = tuple(hidden)
    nx, nt = reference_shape
    moments = input_moments((0.0, 0.0), (1.0, 1.0)) if standardize_inputs else None

    # Jitted callables, as in the other problems (eager small ops would each compile).
    @jax.jit
    def init_params(key: Array) -> Params:
        return init_mlp(key, 2, hidden, 1)

    @jax.jit
    def predict(params: Params, points: Array) -> Array:
        return _net(params, points[:, 0], points[:, 1], moments)

    @jax.jit
    def sample_batch(key: Array) -> dict[str, Array]:
        boxes = {
            "residual": (num_residual, (0.0, 0.0), (1.0, 1.0)),
            "initial": (num_initial, (0.0, 0.0), (1.0, 0.0)),
            "left": (num_boundary, (0.0, 0.0), (0.0, 1.0)),
            "right": (num_boundary, (1.0, 0.0), (1.0, 1.0)),
            "velocity": (num_initial, (0.0, 0.0), (1.0, 0.0)),
        }
        return sample_boxes(key, boxes)

    @jax.jit
    def residuals(params: Params, batch: Batch) -> tuple[Array, ...]:
        initial = batch["initial"]
        return (
            wave_residual(params, batch["residual"], moments=moments),
            predict(params, initial) - wave_exact(initial[:, 0], 0.0, amplitude),
            predict(params, batch["left"]),
            predict(params, batch["right"]),
            wave_velocity(params, batch["velocity"], moments=moments),
        )

    @jax.jit
    def loss_components(params: Params, batch: Batch) -> Array:
        return jnp.stack([jnp.mean(r**2) for r in residuals(params, batch)])

    @functools.cache
    def reference() -> tuple[np.ndarray, np.ndarray]:
        xx, tt = np.meshgrid(np.linspace(0.0, 1.0, nx), np.linspace(0.0, 1.0, nt), indexing="ij")
        points = np.stack([xx.ravel(), tt.ravel()], axis=-1)
        u = wave_exact(points[:, 0], points[:, 1], amplitude)
        for a in (points, u):
            a.setflags(write=False)
        return points, u

    return Problem(
        name="wave",
        component_names=COMPONENT_NAMES,
        init_params=init_params,
        loss_components=loss_components,
        residuals=residuals,
        sample_batch=sample_batch,
        predict=predict,
        reference=reference,
        relative_l2_error=reference_error_fn(predict, reference),
        resample=bool(resample),
        term_groups=None if term_groups is None else tuple(term_groups),
    )
