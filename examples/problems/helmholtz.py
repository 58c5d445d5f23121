"""2-D Helmholtz equation with a manufactured solution: the PINN problem.

    u_xx + u_yy + k² u = q(x, y)   on [-1, 1]²,   u = 0 on the boundary,
    u(x, y) = sin(a1 pi x) sin(a2 pi y),
    q(x, y) = (k² - (a1 pi)² - (a2 pi)²) sin(a1 pi x) sin(a2 pi y),

with ``k = 1``, ``a1 = 1``, ``a2 = 4`` (Wang, Teng & Perdikaris 2021). The residual is
O(100) while the boundary terms are O(1): the stiff imbalance loss balancers target.
The five loss components are the mean squared residual and the errors on the edges
``x = -1`` ("left"), ``x = 1`` ("right"), ``y = -1`` ("bottom") and ``y = 1`` ("top").
:func:`helmholtz_wang2021_problem` is the authors' own set-up of this benchmark.
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

COMPONENT_NAMES: tuple[str, ...] = ("residual", "left", "right", "bottom", "top")
# The authors' loss: the residual, plus one weight on the sum of the four edge errors.
WANG2021_GROUPS: tuple[int, ...] = (0, 1, 1, 1, 1)
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


def _net(params: Params, x: Array, y: Array, moments: Moments | None = None) -> Array:
    """Network output ``u [N]`` at ``x [N]``, ``y [N]`` (inputs standardised with ``moments``)."""
    return mlp_apply(params, standardize(jnp.stack([x, y], axis=-1), moments))[:, 0]


def helmholtz_residual(
    params: Params,
    points: Array,
    k: float = 1.0,
    a1: float = 1.0,
    a2: float = 4.0,
    *,
    moments: Moments | None = None,
) -> Array:
    """PDE residual ``u_xx + u_yy + k² u - q`` of the network at each point.

    Per-point second derivatives come from nested batched ``jax.jvp`` with all-ones
    tangents, valid because the network maps rows independently. The derivatives are
    taken with respect to the raw coordinates, so a standardisation of the inputs is
    differentiated through (the originals divide by ``std`` by hand, which is the same).

    Args:
      params: network parameters.
      points: ``[N, 2]`` columns ``(x, y)``.
      k: wave number.
      a1: x frequency of the manufactured solution.
      a2: y frequency of the manufactured solution.
      moments: optional ``(mean [2], std [2])``; the network sees ``(X - mean) / std``.

    Returns:
      ``[N]``.
    """
    x, y = points[:, 0], points[:, 1]
    ones = jnp.ones_like(x)

    def u_and_ux(x_: Array) -> tuple[Array, Array]:
        return jax.jvp(lambda xx: _net(params, xx, y, moments), (x_,), (ones,))

    def u_y(y_: Array) -> Array:
        return jax.jvp(lambda yy: _net(params, x, yy, moments), (y_,), (ones,))[1]

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
    resample: bool = False,
    standardize_inputs: bool = False,
    term_groups: Sequence[int] | None = WANG2021_GROUPS,
    name: str = "helmholtz",
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
      resample: training draws fresh points every step (:meth:`Problem.next_points`).
      standardize_inputs: feed the network ``(X - mean) / std`` with the moments of
        100,000 uniform points of the square (:func:`input_moments`), as the authors do.
      term_groups: the grouping recorded as ``Problem.term_groups`` (default: the
        authors', the four edges as one term).
      name: the ``Problem.name``.

    Returns:
      A :class:`Problem`. Its batch maps each of ``COMPONENT_NAMES`` to points
      ``[N, 2]`` with columns ``(x, y)``.
    """
    hidden = tuple(hidden)
    moments = input_moments((-1.0, -1.0), (1.0, 1.0)) if standardize_inputs else None

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
        boxes = {"residual": (num_residual, (-1.0, -1.0), (1.0, 1.0))}
        boxes.update({name: (num_boundary, lo, hi) for name, (lo, hi) in _EDGES.items()})
        return sample_boxes(key, boxes)

    @jax.jit
    def residuals(params: Params, batch: Batch) -> tuple[Array, ...]:
        residual = helmholtz_residual(params, batch["residual"], k, a1, a2, moments=moments)
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
        name=name,
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


# The authors' configuration (GradientPathologiesPINNs, Helmholtz/Helmholtz2D.py and
# Helmholtz2D_model_tf.py): layers [2, 50, 50, 50, 1], batch 128 for the residual and for
# each edge, drawn afresh every iteration, standardised inputs, a 100 x 100 test grid.
WANG2021_OPTIONS: dict[str, object] = {
    "hidden": (50, 50, 50),
    "num_residual": 128,
    "num_boundary": 128,
    "reference_size": 100,
    "resample": True,
    "standardize_inputs": True,
}


def helmholtz_wang2021_problem(**overrides: object) -> Problem:
    """The Helmholtz benchmark as Wang, Teng & Perdikaris (2021) set it up.

    Reproduces the problem and network of GradientPathologiesPINNs (commit 93e752b,
    ``Helmholtz/Helmholtz2D.py``, ``Helmholtz2D_model_tf.py``): ``u = sin(pi x)
    sin(4 pi y)`` on ``[-1, 1]²``, ``k = 1`` (their ``lam``); a tanh MLP ``[2, 50, 50,
    50, 1]`` with Glorot-normal weights and zero biases; inputs standardised by the
    moments of 100,000 uniform points; 128 fresh residual points and 128 fresh points
    per edge every step; relative L2 error on the 100 x 100 grid of
    ``linspace(-1, 1, 100)²``; the four edges share one weight (``term_groups``).

    The training recipe is not part of a :class:`Problem`: the authors use Adam with
    learning rate ``1e-3 * 0.9 ** (step / 1000)`` (``tf.train.exponential_decay``,
    ``staircase=False``) for 40,001 steps (:data:`WANG2021_TRAINING`).

    Deliberate differences: the edge targets are 0 (the authors evaluate
    ``sin(±pi) ≈ 1.2e-16``); the random draws are JAX's, not NumPy's.

    Args:
      **overrides: keyword arguments of :func:`helmholtz_problem` replacing the authors'.

    Returns:
      The :class:`Problem`, named ``"helmholtz_wang2021"``.
    """
    options = {**WANG2021_OPTIONS, "name": "helmholtz_wang2021", **overrides}
    return helmholtz_problem(**options)  # type: ignore[arg-type]


# The authors' optimiser schedule and budget (Helmholtz2D_model_tf.py, Helmholtz2D.py).
WANG2021_TRAINING: dict[str, float | int] = {
    "learning_rate": 1e-3,
    "decay_rate": 0.9,
    "decay_steps": 1000,
    "steps": 40_001,
}
