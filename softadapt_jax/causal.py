"""Causal weighting of a time-dependent PINN residual (Wang, Sankaran & Perdikaris 2022).

"Respecting causality is all you need for training physics-informed neural
networks" (arXiv:2203.07404) splits the residual's collocation points into M
consecutive time chunks with losses ``L_1 .. L_M`` and weighs chunk i by
``w_i = exp(-tol * sum_{j<i} L_j)``, held constant (``stop_gradient``): a later
chunk counts only once every earlier chunk is fitted. The residual loss is
``mean_i(w_i L_i)``. ``tol`` (the paper's epsilon) is an array, so a sweep over
it can be vmapped. The chunking follows jaxpi (PredictiveIntelligenceLab/jaxpi
@ e85b694, ``examples/burgers/models.py`` ``res_and_w`` and ``jaxpi/models.py``):
the points are ordered by time, then cut into M equal consecutive blocks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softadapt_jax._checks import check_choice, check_positive_int

TIME_SORT_CONVENTIONS = ("jaxpi", "rows")
"""The accepted values of ``time_sorted(convention=...)``."""


def time_sorted(points: Any, time_index: int = 0, *, convention: str = "jaxpi") -> jax.Array:
    """Collocation points ``[N, d]`` ordered by their time coordinate, ready for chunking.

    Args:
      points: ``[N, d]`` coordinates, one point a row.
      time_index: the column holding time (jaxpi's examples: 0).
      convention: ``"jaxpi"`` (default, as jaxpi's examples do it) sorts the
        time column alone and leaves the other columns in their sampled
        order, so the rows are new points: the same time values paired with
        other spatial coordinates. For points drawn independently and
        uniformly in time and space (jaxpi's ``UniformSampler``) that is
        again such a sample; for anything else (a grid, points with targets,
        a spatial coordinate that depends on time) use ``"rows"``, which
        sorts whole rows by time, so every point keeps its coordinates.

    Returns:
      ``[N, d]``, non-decreasing in column ``time_index``.

    Raises:
      ValueError: ``points`` not two-dimensional, ``time_index`` out of
        range, or an unknown ``convention``.
    """
    check_choice(convention, "convention", TIME_SORT_CONVENTIONS)
    points = jnp.asarray(points)
    if points.ndim != 2:
        raise ValueError(f"`points` must be [N, d] (one point a row); got shape {points.shape}.")
    if (
        isinstance(time_index, bool)
        or not isinstance(time_index, int)
        or not 0 <= time_index < points.shape[1]
    ):
        raise ValueError(
            f"`time_index` must be an int column index in [0, {points.shape[1]}); got {time_index!r}."
        )
    if convention == "rows":
        return points[jnp.argsort(points[:, time_index], stable=True)]
    return points.at[:, time_index].set(jnp.sort(points[:, time_index]))


def causal_weights(chunk_losses: Any, tol: Any) -> jax.Array:
    """``w_i = exp(-tol * sum_{j<i} L_j)``: the causal weights of M time-ordered chunk losses.

    Computed under ``stop_gradient`` (the weights are constants for the
    gradient, as in the paper and jaxpi). ``w_1 = 1``; the weights do not
    increase along the chunks for ``tol >= 0`` and losses ``>= 0`` (a negative
    ``tol`` is not checked, arrays being traced, and gives increasing weights).

    Args:
      chunk_losses: ``[..., M]`` per-chunk losses, oldest chunk first; leading
        axes are independent fields (e.g. the momentum and continuity
        residuals of jaxpi's Navier-Stokes examples, each with its own weights).
      tol: the causality parameter, a scalar or an array broadcastable to the
        leading shape ``[...]`` (one per field, or a batch of values to sweep).

    Returns:
      ``[..., M]`` weights in ``(0, 1]``. A non-finite chunk loss makes the
      weights of the later chunks non-finite or 0, and the loss it enters
      non-finite: never a finite wrong value.

    Raises:
      ValueError: ``chunk_losses`` a scalar, or ``tol`` not broadcastable to
        its leading shape.
    """
    losses = jnp.asarray(chunk_losses)
    if losses.ndim == 0:
        raise ValueError("`chunk_losses` must have a trailing chunk axis [..., M]; got a scalar.")
    tol = jnp.asarray(tol, jnp.result_type(losses.dtype, float))
    try:
        jnp.broadcast_shapes(tol.shape, losses.shape[:-1])
    except ValueError:
        raise ValueError(
            f"`tol` of shape {tol.shape} does not broadcast to the leading shape {losses.shape[:-1]} of "
            f"`chunk_losses` {losses.shape}."
        ) from None
    # Exclusive prefix sum: the sum over the chunks strictly before each one.
    zeros = jnp.zeros_like(losses[..., :1])
    earlier = jnp.concatenate([zeros, jnp.cumsum(losses[..., :-1], axis=-1)], axis=-1)
    return jax.lax.stop_gradient(jnp.exp(-tol[..., None] * earlier))


def causal_chunk_losses(residuals: Any, num_chunks: int) -> jax.Array:
    """``[..., M]`` mean squared residual of each of M consecutive, equal time chunks.

    Args:
      residuals: ``[..., N]`` pointwise residuals, their last axis ordered by
        time (see :func:`time_sorted`).
      num_chunks: M; must divide N (jaxpi reshapes to ``[M, N / M]``).

    Raises:
      ValueError: ``num_chunks`` not a positive integer or not a divisor of N,
        or ``residuals`` a scalar.
    """
    m = check_positive_int(num_chunks, "num_chunks")
    r = jnp.asarray(residuals)
    if r.ndim == 0:
        raise ValueError("`residuals` must have a trailing point axis [..., N]; got a scalar.")
    n = r.shape[-1]
    if n % m:
        raise ValueError(
            f"`num_chunks`={m} must divide the number of time-ordered points N={n} (equal chunks, as in "
            f"jaxpi); got N % num_chunks = {n % m}."
        )
    chunks = r.reshape(*r.shape[:-1], m, n // m)
    return jnp.mean(chunks**2, axis=-1)


def causal_residual_loss(
    residuals: Any, num_chunks: int, tol: Any, *, return_weights: bool = False
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""The causally weighted residual loss ``mean_i(w_i L_i)`` over M time chunks.

    With ``L_i`` the mean squared residual of chunk i (:func:`causal_chunk_losses`)
    and ``w_i`` its causal weight (:func:`causal_weights`)::

        L_r = (1/M) sum_i exp(-tol sum_{j<i} L_j) L_i        (the weights held constant)

    Reproduces jaxpi's causal residual loss (``res_and_w`` then
    ``mean(l * w)`` in ``examples/burgers/models.py``, jaxpi @ e85b694),
    checked in float64 on its recorded Burgers runs (loss, its gradient and
    the causally weighted NTK; tests/test_causal.py). With ``tol = 0`` it is
    the plain mean squared residual.

    Args:
      residuals: ``[..., N]``, the last axis ordered by time; leading axes are
        independent fields, each with its own weights.
      num_chunks: M, a divisor of N.
      tol: scalar or array broadcastable to the leading shape (sweepable).
      return_weights: also return the weights ``[..., M]`` (jaxpi logs their
        minimum to decide when to raise ``tol``, see :func:`causal_converged`).

    Returns:
      ``[...]`` losses, or ``(losses, weights)``.

    Raises:
      ValueError: as :func:`causal_chunk_losses` and :func:`causal_weights`.
    """
    if not isinstance(return_weights, bool):
        raise ValueError(f"`return_weights` must be a bool, got {return_weights!r}.")
    chunk_losses = causal_chunk_losses(residuals, num_chunks)
    weights = causal_weights(chunk_losses, tol)
    loss = jnp.mean(weights * chunk_losses, axis=-1)
    return (loss, weights) if return_weights else loss


def causal_converged(weights: Any, delta: float = 0.99) -> jax.Array:
    """Whether the smallest causal weight exceeds ``delta`` (the paper's signal to raise ``tol``).

    Args:
      weights: ``[..., M]`` causal weights.
      delta: threshold in ``(0, 1)`` (the paper uses 0.99).

    Returns:
      A boolean array of the leading shape ``[...]``.

    Raises:
      ValueError: ``delta`` not in ``(0, 1)``.
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` must be a float in (0, 1), got {delta!r}.")
    return jnp.min(jnp.asarray(weights), axis=-1) > delta
