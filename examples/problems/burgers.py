"""Viscous Burgers' equation: the PINN problem and its Cole-Hopf reference solution.

    u_t + u u_x - nu u_xx = 0,   x in [-1, 1], t in [0, 1],   nu = 0.01 / pi,
    u(x, 0) = -sin(pi x),        u(-1, t) = u(1, t) = 0,

the benchmark of Raissi, Perdikaris & Karniadakis (2019). The four loss components are
the mean squared PDE residual, initial-condition error, and left and right boundary
errors. The reference is the exact solution (Cole-Hopf transform), evaluated in float64
NumPy with Gauss-Hermite quadrature.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from problems.common import (
    DEFAULT_HIDDEN,
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

NU: float = 0.01 / np.pi
COMPONENT_NAMES: tuple[str, ...] = ("residual", "initial", "left", "right")
# Raissi et al. (2019) fit the initial and boundary data as one mean squared error.
RAISSI_GROUPS: tuple[int, ...] = (0, 1, 1, 1)
DEFAULT_NUM_NODES = 250
# numpy.polynomial.hermite.hermgauss overflows beyond ~370 nodes.
MAX_NUM_NODES = 360
# Bounds the [points, nodes] work array of burgers_exact to ~16 MB per chunk.
_CHUNK_ELEMENTS = 2_000_000


def initial_condition(x: Array | np.ndarray) -> Array | np.ndarray:
    """``u(x, 0) = -sin(pi x)``, for NumPy or JAX arrays of any shape."""
    xp = jnp if isinstance(x, jax.Array) else np
    return -xp.sin(np.pi * x)


def burgers_exact(
    x: np.ndarray | float,
    t: np.ndarray | float,
    *,
    nu: float = NU,
    num_nodes: int = DEFAULT_NUM_NODES,
) -> np.ndarray:
    """Exact solution of the Burgers problem, float64, via Cole-Hopf and Gauss-Hermite.

    With ``f(y) = exp(-cos(pi y) / (2 pi nu))`` the solution is

        u(x, t) = -∫ sin(pi (x - η)) f(x - η) exp(-η² / (4 nu t)) dη
                  / ∫ f(x - η) exp(-η² / (4 nu t)) dη,

    and ``η = sqrt(4 nu t) z`` turns both integrals into Gauss-Hermite form. The exponent
    of ``f`` spans ``±1 / (2 pi nu) = ±50``, so the largest exponent per point is
    subtracted before exponentiating; the common factor cancels in the ratio. With the
    default 250 nodes the result agrees with adaptive quadrature to ~1e-15 (including at
    the steepest point of the shock; see the tests).

    Args:
      x: positions in ``[-1, 1]``, any shape broadcastable with ``t``.
      t: times ``>= 0``. At ``t == 0`` the initial condition is returned exactly.
      nu: viscosity.
      num_nodes: Gauss-Hermite nodes, ``1 <= num_nodes <= 360``.

    Returns:
      ``u`` with the broadcast shape of ``x`` and ``t``, float64.
    """
    if not 1 <= num_nodes <= MAX_NUM_NODES:
        raise ValueError(f"num_nodes must be in [1, {MAX_NUM_NODES}], got {num_nodes}")
    x_b, t_b = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(t, dtype=np.float64))
    if np.any(t_b < 0):
        raise ValueError("t must be >= 0")
    x_flat, t_flat = x_b.ravel(), t_b.ravel()
    out = initial_condition(x_flat).astype(np.float64)
    z, w = np.polynomial.hermite.hermgauss(num_nodes)
    positive = np.flatnonzero(t_flat > 0)
    chunk = max(1, _CHUNK_ELEMENTS // num_nodes)
    for start in range(0, positive.size, chunk):
        idx = positive[start : start + chunk]
        scale = np.sqrt(4.0 * nu * t_flat[idx])
        y = x_flat[idx, None] - scale[:, None] * z[None, :]
        exponent = -np.cos(np.pi * y) / (2.0 * np.pi * nu)
        exponent -= exponent.max(axis=1, keepdims=True)
        weighted = w * np.exp(exponent)
        out[idx] = -np.sum(np.sin(np.pi * y) * weighted, axis=1) / np.sum(weighted, axis=1)
    return out.reshape(x_b.shape)


def burgers_reference_grid(
    nx: int = 256,
    nt: int = 100,
    *,
    t_max: float = 1.0,
    nu: float = NU,
    num_nodes: int = DEFAULT_NUM_NODES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact solution on a tensor grid (uncached; see :func:`cached_burgers_reference`).

    Args:
      nx: number of x points, ``linspace(-1, 1, nx)``.
      nt: number of t points, ``linspace(0, t_max, nt)``.
      t_max: last time.
      nu: viscosity.
      num_nodes: Gauss-Hermite nodes.

    Returns:
      ``(x [nx], t [nt], u [nx, nt])`` with ``u[i, j] = u(x[i], t[j])`` (the layout of
      Raissi et al.'s ``burgers_shock.mat``), all float64.
    """
    x = np.linspace(-1.0, 1.0, nx)
    t = np.linspace(0.0, t_max, nt)
    u = burgers_exact(x[:, None], t[None, :], nu=nu, num_nodes=num_nodes)
    return x, t, u


@functools.lru_cache(maxsize=8)
def cached_burgers_reference(
    nx: int = 256,
    nt: int = 100,
    *,
    t_max: float = 1.0,
    nu: float = NU,
    num_nodes: int = DEFAULT_NUM_NODES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`burgers_reference_grid`, memoised; the arrays are read-only to protect the cache."""
    arrays = burgers_reference_grid(nx, nt, t_max=t_max, nu=nu, num_nodes=num_nodes)
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _net(params: Params, x: Array, t: Array, moments: Moments | None = None) -> Array:
    """Network output ``u [N]`` at ``x [N]``, ``t [N]``."""
    if moments is not None:
        return mlp_apply(params, standardize(jnp.stack([x, t], axis=-1), moments))[:, 0]
    # Map t in [0, 1] to [-1, 1] so both inputs share the scale tanh layers expect.
    inputs = jnp.stack([x, 2.0 * t - 1.0], axis=-1)
    return mlp_apply(params, inputs)[:, 0]


def burgers_residual(
    params: Params, points: Array, nu: float = NU, *, moments: Moments | None = None
) -> Array:
    """PDE residual ``u_t + u u_x - nu u_xx`` of the network at each point.

    The network maps rows independently, so batched forward mode (``jax.linearize`` /
    ``jax.jvp``) with an all-ones tangent yields every point's own derivative in one pass
    over the batch, far cheaper than ``vmap`` of per-point ``grad``/``hessian``.

    Args:
      params: network parameters.
      points: ``[N, 2]`` columns ``(x, t)``.
      nu: viscosity.
      moments: optional ``(mean [2], std [2])``; the network then sees ``(X - mean) /
        std`` instead of ``(x, 2 t - 1)``.

    Returns:
      ``[N]``.
    """
    x, t = points[:, 0], points[:, 1]
    ones, zeros = jnp.ones_like(x), jnp.zeros_like(x)

    def first_order(x_: Array) -> tuple[Array, Array, Array]:
        # One linearisation serves both u_x and u_t, sharing the primal pass.
        u, tangent = jax.linearize(lambda xx, tt: _net(params, xx, tt, moments), x_, t)
        return u, tangent(ones, zeros), tangent(zeros, ones)

    (u, u_x, u_t), (_, u_xx, _) = jax.jvp(first_order, (x,), (ones,))
    return u_t + u * u_x - nu * u_xx


def burgers_problem(
    *,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    num_residual: int = 1024,
    num_initial: int = 256,
    num_boundary: int = 128,
    nu: float = NU,
    reference_shape: tuple[int, int] = (256, 100),
    resample: bool = False,
    standardize_inputs: bool = False,
    term_groups: Sequence[int] | None = RAISSI_GROUPS,
) -> Problem:
    """The Burgers PINN problem (K = 4: residual, initial, left, right).

    Args:
      hidden: hidden-layer widths of the tanh MLP.
      num_residual: interior collocation points, uniform on ``[-1, 1] x [0, 1]``.
      num_initial: initial-condition points, ``t = 0``, ``x`` uniform.
      num_boundary: points on each of ``x = -1`` and ``x = 1``, ``t`` uniform.
      nu: viscosity.
      reference_shape: ``(nx, nt)`` of the reference grid for ``relative_l2_error``.
      resample: training draws fresh points every step (:meth:`Problem.next_points`).
      standardize_inputs: feed the network ``(X - mean) / std`` with the moments of
        100,000 uniform points of the domain (:func:`input_moments`) instead of the
        default ``(x, 2 t - 1)``.
      term_groups: the grouping recorded as ``Problem.term_groups`` (default: Raissi et
        al.'s, the initial and boundary data as one term).

    Returns:
      A :class:`Problem`. Its batch is ``{"residual": [N_r, 2], "initial": [N_0, 2],
      "left": [N_b, 2], "right": [N_b, 2]}`` with columns ``(x, t)``.
    """
    hidden = tuple(hidden)
    nx, nt = reference_shape
    moments = input_moments((-1.0, 0.0), (1.0, 1.0)) if standardize_inputs else None

    # Every callable is jitted: run eagerly, their many small ops would each compile
    # separately (seconds in total on CPU). Inside an outer jit they are simply inlined.
    @jax.jit
    def init_params(key: Array) -> Params:
        return init_mlp(key, 2, hidden, 1)

    @jax.jit
    def predict(params: Params, points: Array) -> Array:
        return _net(params, points[:, 0], points[:, 1], moments)

    @jax.jit
    def sample_batch(key: Array) -> dict[str, Array]:
        boxes = {
            "residual": (num_residual, (-1.0, 0.0), (1.0, 1.0)),
            "initial": (num_initial, (-1.0, 0.0), (1.0, 0.0)),
            "left": (num_boundary, (-1.0, 0.0), (-1.0, 1.0)),
            "right": (num_boundary, (1.0, 0.0), (1.0, 1.0)),
        }
        return sample_boxes(key, boxes)

    @jax.jit
    def residuals(params: Params, batch: Batch) -> tuple[Array, ...]:
        initial = batch["initial"]
        return (
            burgers_residual(params, batch["residual"], nu, moments=moments),
            predict(params, initial) - initial_condition(initial[:, 0]),
            predict(params, batch["left"]),
            predict(params, batch["right"]),
        )

    @jax.jit
    def loss_components(params: Params, batch: Batch) -> Array:
        return jnp.stack([jnp.mean(r**2) for r in residuals(params, batch)])

    @functools.cache
    def reference() -> tuple[np.ndarray, np.ndarray]:
        x, t, u = cached_burgers_reference(nx, nt, nu=nu)
        xx, tt = np.meshgrid(x, t, indexing="ij")
        points, u_flat = np.stack([xx.ravel(), tt.ravel()], axis=-1), u.ravel()
        points.setflags(write=False)
        return points, u_flat

    relative_l2_error = reference_error_fn(predict, reference)

    return Problem(
        name="burgers",
        component_names=COMPONENT_NAMES,
        init_params=init_params,
        loss_components=loss_components,
        residuals=residuals,
        sample_batch=sample_batch,
        predict=predict,
        reference=reference,
        relative_l2_error=relative_l2_error,
        resample=bool(resample),
        term_groups=None if term_groups is None else tuple(term_groups),
    )
