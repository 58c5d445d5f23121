"""Shared pieces of the PINN problems: the :class:`Problem` record, a tanh MLP, samplers and
the collocation stream that a training loop carries (fixed points, or fresh points every step).

The MLP is a pure function over a params pytree (a tuple of ``{"w", "b"}`` dicts), so
it works unchanged with ``jax.grad``, ``jax.jvp``, ``jax.jit`` and optax.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = Any
Batch = Mapping[str, Array]
# (mean [d], std [d]) of the inputs, for standardize().
Moments = tuple[np.ndarray, np.ndarray]

DEFAULT_HIDDEN: tuple[int, ...] = (64, 64, 64)
# The authors of the learning-rate-annealing and NTK papers standardise the network inputs
# with the moments of 100,000 uniform residual points (GradientPathologiesPINNs, PINNsNTK).
STANDARDIZE_SAMPLE: int = 100_000


class PointStream(NamedTuple):
    """The collocation points a training loop carries from step to step.

    Attributes:
      key: PRNG key of the next draw (unused with fixed points).
      batch: the points of the last step (with fixed points: the one set, used every step).
    """

    key: Array
    batch: dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A physics-informed learning problem with ``K`` loss components.

    Every callable except ``reference`` is pure and already wrapped in ``jax.jit`` (and
    composes with an outer ``jit``, ``grad`` or ``vmap``). The record is frozen and
    hashable, so it can be a ``jit`` static argument.

    Attributes:
      name: short identifier, as accepted by :func:`problems.get_problem`.
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
      resample: whether :meth:`next_points` draws fresh collocation points every step
        (``True``) or hands out one fixed set (``False``).
      term_groups: the grouping of the loss terms in the paper the set-up comes from
        (terms with one group id share one weight there), as accepted by the balancers'
        ``groups=``; ``None`` when every term has its own weight.
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
    resample: bool = False
    term_groups: tuple[int, ...] | None = None

    @property
    def num_losses(self) -> int:
        """``K``, the number of loss components."""
        return len(self.component_names)

    def init_points(self, key: Array) -> PointStream:
        """The collocation stream of a run: the fixed set, or the key of the fresh draws.

        Pure and jittable (``vmap`` it over seeds).

        Args:
          key: PRNG key; the same key gives the same stream.

        Returns:
          A :class:`PointStream`.
        """
        first, rest = jax.random.split(key)
        return PointStream(rest, self.sample_batch(first))

    def next_points(self, stream: PointStream) -> tuple[dict[str, Array], PointStream]:
        """The points of one training step, and the stream for the next.

        With ``resample`` a fresh batch is drawn from the carried key (inside ``jit`` /
        ``lax.scan``, with no host round trip), as the learning-rate-annealing and NTK
        authors do every iteration; otherwise the fixed set is returned unchanged.

        Args:
          stream: from :meth:`init_points` or the previous call.

        Returns:
          ``(batch, stream)``.
        """
        if not self.resample:
            return stream.batch, stream
        key, draw = jax.random.split(stream.key)
        batch = self.sample_batch(draw)
        return batch, PointStream(key, batch)


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


def input_moments(
    lower: Sequence[float], upper: Sequence[float], *, num: int = STANDARDIZE_SAMPLE, seed: int = 0
) -> Moments:
    """Mean and standard deviation of ``num`` uniform points of a box, for input standardisation.

    The originals (GradientPathologiesPINNs, PINNsNTK) draw 100,000 residual points and
    feed the network ``(X - mean) / std``; a fixed seed makes ours deterministic.

    Args:
      lower: lower corner ``[d]``.
      upper: upper corner ``[d]``.
      num: number of points.
      seed: NumPy seed of the draw.

    Returns:
      ``(mean [d], std [d])``, float64, read-only.

    Raises:
      ValueError: ``num < 2`` or a corner pair with ``upper <= lower``.
    """
    lo, hi = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"`num` must be an int >= 2, got {num!r}.")
    if lo.shape != hi.shape or lo.ndim != 1 or np.any(hi <= lo):
        raise ValueError(f"`upper` must exceed `lower` on every axis, got lower={lower}, upper={upper}.")
    points = lo + (hi - lo) * np.random.default_rng(seed).random((num, lo.size))
    mean, std = points.mean(0), points.std(0)
    for a in (mean, std):
        a.setflags(write=False)
    return mean, std


def standardize(inputs: Array, moments: Moments | None) -> Array:
    """``(inputs - mean) / std`` for ``moments = (mean, std)``; ``inputs`` unchanged for ``None``."""
    if moments is None:
        return inputs
    mean, std = moments
    return (inputs - jnp.asarray(mean, inputs.dtype)) / jnp.asarray(std, inputs.dtype)


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
