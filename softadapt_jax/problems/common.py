"""Shared pieces of the PINN problems: the :class:`Problem` record, a tanh MLP and samplers.

The MLP is a pure function over a params pytree (a tuple of ``{"w", "b"}`` dicts), so
it works unchanged with ``jax.grad``, ``jax.jvp``, ``jax.jit`` and optax.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = Any
Batch = Mapping[str, Array]

DEFAULT_HIDDEN: tuple[int, ...] = (64, 64, 64)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A physics-informed learning problem with ``K`` loss components.

    Every callable except ``reference`` is pure and already wrapped in ``jax.jit`` (and
    composes with an outer ``jit``, ``grad`` or ``vmap``). The record is frozen and
    hashable, so it can be a ``jit`` static argument.

    Attributes:
      name: short identifier, as accepted by :func:`softadapt_jax.problems.get_problem`.
      component_names: names of the ``K`` loss components, in the order of
        ``loss_components``' output; also the keys of the batch.
      init_params: ``key -> params``, a fresh network.
      loss_components: ``(params, batch) -> losses [K]``, each a mean squared error.
      residuals: ``(params, batch) -> K arrays`` of per-point residuals, whose mean
        squares are the losses (what NTK weighting differentiates point by point).
      sample_batch: ``key -> batch``, a dict mapping each component name to its
        collocation points ``[N_c, d]``. The same key gives the same points, so a
        training run can keep one fixed set or resample every step. (Being jitted, it
        returns the dict with keys sorted, as JAX flattens dicts; look sets up by name.)
      predict: ``(params, points [N, d]) -> u [N]``.
      reference: ``() -> (points [M, d], u_ref [M])``, NumPy float64, cached.
      relative_l2_error: ``params -> scalar``, ``||u - u_ref||_2 / ||u_ref||_2`` on the
        reference grid.
    """

    name: str
    component_names: tuple[str, ...]
    init_params: Callable[[Array], Params]
    loss_components: Callable[[Params, Batch], Array]
    residuals: Callable[[Params, Batch], tuple[Array, ...]]
    sample_batch: Callable[[Array], dict[str, Array]]
    predict: Callable[[Params, Array], Array]
    reference: Callable[[], tuple[np.ndarray, np.ndarray]]
    relative_l2_error: Callable[[Params], Array]

    @property
    def num_losses(self) -> int:
        """``K``, the number of loss components."""
        return len(self.component_names)


def init_mlp(key: Array, in_dim: int, hidden: Sequence[int] = DEFAULT_HIDDEN, out_dim: int = 1) -> Params:
    """Glorot-normal weights and zero biases for :func:`mlp_apply`.

    Glorot (Xavier) initialisation is the usual choice for tanh PINNs (Raissi et al. 2019):
    it keeps the pre-activations O(1), so tanh starts out of saturation.

    Args:
      key: PRNG key.
      in_dim: input dimension ``d``.
      hidden: widths of the hidden layers.
      out_dim: output dimension.

    Returns:
      A tuple of ``{"w": [fan_in, fan_out], "b": [fan_out]}`` dicts, one per layer, in
      JAX's default float dtype.
    """
    sizes = (in_dim, *hidden, out_dim)
    shapes = list(itertools.pairwise(sizes))
    # One draw sliced into layers: each jax.random call costs ~0.3 s of XLA compile on CPU.
    flat = jax.random.normal(key, (sum(m * n for m, n in shapes),))
    layers, start = [], 0
    for fan_in, fan_out in shapes:
        std = np.sqrt(2.0 / (fan_in + fan_out))
        w = std * flat[start : start + fan_in * fan_out].reshape(fan_in, fan_out)
        layers.append({"w": w, "b": jnp.zeros((fan_out,), flat.dtype)})
        start += fan_in * fan_out
    return tuple(layers)


def mlp_apply(params: Params, inputs: Array) -> Array:
    """The tanh MLP of :func:`init_mlp` on a batch.

    Rows are independent (no normalisation across the batch), so the Jacobian of the
    output with respect to the inputs is block diagonal; the problems rely on this to take
    per-point derivatives with one batched ``jax.jvp``.

    Args:
      params: from :func:`init_mlp`.
      inputs: ``[N, d]``.

    Returns:
      ``[N, out_dim]``.
    """
    h = inputs
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def sample_boxes(
    key: Array, boxes: Mapping[str, tuple[int, Sequence[float], Sequence[float]]]
) -> dict[str, Array]:
    """Points drawn uniformly from named boxes.

    A degenerate axis (``lower[i] == upper[i]``) pins that coordinate, which is how the
    boundary and initial sets are drawn.

    Args:
      key: PRNG key; the same key gives the same points.
      boxes: ``name -> (num, lower [d], upper [d])``; every box has the same ``d``.

    Returns:
      ``name -> points [num, d]``, in the order of ``boxes``.
    """
    nums = [num for num, _, _ in boxes.values()]
    lower = np.concatenate(
        [np.broadcast_to(np.asarray(lo, float), (n, len(lo))) for n, lo, _ in boxes.values()]
    )
    upper = np.concatenate(
        [np.broadcast_to(np.asarray(hi, float), (n, len(hi))) for n, _, hi in boxes.values()]
    )
    # One draw for all sets: each jax.random call costs ~0.3 s of XLA compile on CPU.
    u = jax.random.uniform(key, lower.shape)
    # lo + (hi - lo) * u keeps pinned coordinates exact (hi - lo == 0).
    points = jnp.asarray(lower, u.dtype) + jnp.asarray(upper - lower, u.dtype) * u
    return dict(zip(boxes, jnp.split(points, np.cumsum(nums)[:-1]), strict=True))


def relative_l2(prediction: Array, reference: Array) -> Array:
    """``||prediction - reference||_2 / ||reference||_2`` over all entries.

    Args:
      prediction: any shape.
      reference: same shape.

    Returns:
      Scalar.
    """
    return jnp.linalg.norm(prediction - reference) / jnp.linalg.norm(reference)


def reference_error_fn(
    predict: Callable[[Params, Array], Array], reference: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> Callable[[Params], Array]:
    """A jitted ``params -> ||u - u_ref||_2 / ||u_ref||_2`` on the problem's reference grid.

    Args:
      predict: ``(params, points [M, d]) -> u [M]``.
      reference: ``() -> (points [M, d], u_ref [M])``.

    Returns:
      The error function, a scalar per call.
    """

    @jax.jit
    def relative_l2_error(params: Params) -> Array:
        points, u_ref = reference()
        return relative_l2(predict(params, jnp.asarray(points)), jnp.asarray(u_ref))

    return relative_l2_error
