"""2-D Helmholtz equation with a manufactured solution: the PINN problem.

    u_xx + u_yy + k² u = q(x, y)   on [-1, 1]²,   u = 0 on the boundary,
    u(x, y) = sin(a1 pi x) sin(a2 pi y),
    q(x, y) = (k² - (a1 pi)² - (a2 pi)²) sin(a1 pi x) sin(a2 pi y),

with ``k = 1``, ``a1 = 1``, ``a2 = 4`` (Wang, Teng & Perdikaris 2021). The residual is
O(100) while the boundary terms are O(1): the stiff imbalance loss balancers target.
The five loss components are the mean squared residual and the errors on the edges
``x = -1`` ("left"), ``x = 1`` ("right"), ``y = -1`` ("bottom") and ``y = 1`` ("top").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax.problems.common import (
    DEFAULT_HIDDEN,
    Array,
    Batch,
    Params,
    Problem,
    init_mlp,
    mlp_apply,
    reference_error_fn,
    sample_boxes,
)

COMPONENT_NAMES: tuple[str, ...] = ("residual", "left", "right", "bottom", "top")
# (lower corner, upper corner) of each edge, in COMPONENT_NAMES order after "residual".
_EDGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left": ((-1.0, -1.0), (-1.0, 1.0)),
    "right": ((1.0, -1.0), (1.0, 1.0)),
    "bottom": ((-1.0, -1.0), (1.0, -1.0)),
    "top": ((-1.0, 1.0), (1.0, 1.0)),
}


def helmholtz_exact(x: Array, y: Array, a1: float = 1.0, a2: float = 4.0) -> Array:
    """Exact solution ``sin(a1 pi x) sin(a2 pi y)``; NumPy or JAX arrays, broadcasting."""
    xp = jnp if isinstance(x, jax.Array) or isinstance(y, jax.Array) else np
    return xp.sin(a1 * np.pi * x) * xp.sin(a2 * np.pi * y)


def helmholtz_source(x: Array, y: Array, k: float = 1.0, a1: float = 1.0, a2: float = 4.0) -> Array:
    """Forcing ``q`` that makes :func:`helmholtz_exact` solve the equation; broadcasting."""
    return (k**2 - (a1 * np.pi) ** 2 - (a2 * np.pi) ** 2) * helmholtz_exact(x, y, a1, a2)


def _net(params: Params, x: Array, y: Array) -> Array:
    """Network output ``u [N]`` at ``x [N]``, ``y [N]``."""
    return mlp_apply(params, jnp.stack([x, y], axis=-1))[:, 0]


def helmholtz_residual(
    params: Params, points: Array, k: float = 1.0, a1: float = 1.0, a2: float = 4.0
) -> Array:
    """PDE residual ``u_xx + u_yy + k² u - q`` of the network at each point.

    Per-point second derivatives come from nested batched ``jax.jvp`` with all-ones
    tangents, valid because the network maps rows independently.

    Args:
      params: network parameters.
      points: ``[N, 2]`` columns ``(x, y)``.
      k: wave number.
      a1: x frequency of the manufactured solution.
      a2: y frequency of the manufactured solution.

    Returns:
      ``[N]``.
    """
    x, y = points[:, 0], points[:, 1]
    ones = jnp.ones_like(x)

    def u_and_ux(x_: Array) -> tuple[Array, Array]:
        return jax.jvp(lambda xx: _net(params, xx, y), (x_,), (ones,))

    def u_y(y_: Array) -> Array:
        return jax.jvp(lambda yy: _net(params, x, yy), (y_,), (ones,))[1]

    (u, _), (_, u_xx) = jax.jvp(u_and_ux, (x,), (ones,))
    u_yy = jax.jvp(u_y, (y,), (ones,))[1]
    return u_xx + u_yy + k**2 * u - helmholtz_source(x, y, k, a1, a2)


def helmholtz_problem(
    *,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    num_residual: int = 1024,
    num_boundary: int = 128,
    k: float = 1.0,
    a1: float = 1.0,
    a2: float = 4.0,
    reference_size: int = 128,
) -> Problem:
    """The Helmholtz PINN problem (K = 5: residual, left, right, bottom, top).

    Args:
      hidden: hidden-layer widths of the tanh MLP.
      num_residual: interior collocation points, uniform on ``[-1, 1]²``.
      num_boundary: points on each edge, uniform along it.
      k: wave number.
      a1: x frequency of the manufactured solution (an integer keeps it zero on the
        boundary).
      a2: y frequency, likewise.
      reference_size: the reference grid is ``reference_size²`` points of
        ``linspace(-1, 1, reference_size)²``.

    Returns:
      A :class:`Problem`. Its batch maps each of ``COMPONENT_NAMES`` to points
      ``[N, 2]`` with columns ``(x, y)``.
    """
    hidden = tuple(hidden)

    # Every callable is jitted: run eagerly, their many small ops would each compile
    # separately (seconds in total on CPU). Inside an outer jit they are simply inlined.
    @jax.jit
    def init_params(key: Array) -> Params:
        return init_mlp(key, 2, hidden, 1)

    @jax.jit
    def predict(params: Params, points: Array) -> Array:
        return _net(params, points[:, 0], points[:, 1])

    @jax.jit
    def sample_batch(key: Array) -> dict[str, Array]:
        boxes = {"residual": (num_residual, (-1.0, -1.0), (1.0, 1.0))}
        boxes.update({name: (num_boundary, lo, hi) for name, (lo, hi) in _EDGES.items()})
        return sample_boxes(key, boxes)

    @jax.jit
    def residuals(params: Params, batch: Batch) -> tuple[Array, ...]:
        residual = helmholtz_residual(params, batch["residual"], k, a1, a2)
        # The exact solution vanishes on the boundary, so the edge targets are 0.
        return (residual, *(predict(params, batch[name]) for name in COMPONENT_NAMES[1:]))

    @jax.jit
    def loss_components(params: Params, batch: Batch) -> Array:
        return jnp.stack([jnp.mean(r**2) for r in residuals(params, batch)])

    @functools.cache
    def reference() -> tuple[np.ndarray, np.ndarray]:
        grid = np.linspace(-1.0, 1.0, reference_size)
        xx, yy = np.meshgrid(grid, grid, indexing="ij")
        points = np.stack([xx.ravel(), yy.ravel()], axis=-1)
        u = helmholtz_exact(points[:, 0], points[:, 1], a1, a2)
        for a in (points, u):
            a.setflags(write=False)
        return points, u

    relative_l2_error = reference_error_fn(predict, reference)

    return Problem(
        name="helmholtz",
        component_names=COMPONENT_NAMES,
        init_params=init_params,
        loss_components=loss_components,
        residuals=residuals,
        sample_batch=sample_batch,
        predict=predict,
        reference=reference,
        relative_l2_error=relative_l2_error,
    )
