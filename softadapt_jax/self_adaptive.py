"""Self-adaptive point-wise weights (SA-PINN; McClenny & Braga-Neto 2023, arXiv:2009.04544).

Every collocation, boundary or initial point i of a loss term gets a trainable
weight ``lambda_i``; the term's loss is ``mean_i m(lambda_i) r_i^2`` with a mask
function ``m`` (non-negative, increasing). The network parameters ``w``
minimise the total loss while the weights *maximise* it::

    min_w max_lambda  L(w, lambda) = sum_terms mean_i m(lambda_i) r_i(w)^2
    w      <- w      - eta_w      dL/dw          (descent)
    lambda <- lambda + eta_lambda dL/dlambda     (ascent; dL/dlambda_i = m'(lambda_i) r_i^2 / N >= 0)

so a weight grows the faster the larger its point's residual, and never
decreases. Both gradients come from ONE ``jax.grad`` of the loss with respect
to the pytree ``{"net": params, "sa": SelfAdaptiveState}``; :func:`sa_optimizer`
is the optax transform over that pytree (``optax.multi_transform``: the
network's optimizer on ``"net"``, the weights' optimizer with the gradient's
sign flipped on ``"sa"``), so one ``update``/``apply_updates`` steps both::

    params = {"net": net_params, "sa": sa_init({"res": 128, "bc": 2})}
    tx = sa_optimizer(optax.adam(1e-3), optax.adam(1e-3))
    grads = jax.grad(lambda p: sa_loss(residuals(p["net"]), p["sa"])[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

The authors' code (levimcclenny/SA-PINNs, ``Burgers/burgers.py``) averages
``(lambda_i r_i)^2`` over the points, i.e. the polynomial mask ``lambda^2``
(the default here) under a mean, and steps the weights with Adam on the
negated gradient; the point-wise weights need a fixed set of points (the
paper's Gaussian-process extension to resampled points is not implemented).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softadapt_jax._checks import check_choice, check_float, check_positive_int

SA_MASKS = ("identity", "polynomial", "sigmoid")
"""The named mask functions of :func:`sa_mask`."""

Mask = Callable[[jax.Array], jax.Array]


class SelfAdaptiveState(NamedTuple):
    """The trainable point-wise weights, one vector per self-adaptive loss term."""

    weights: dict[str, jax.Array]  # term -> [N_term] lambda, one per point of that term


def sa_mask(name: str | Mask = "polynomial", *, c: float = 1.0, q: float = 2.0) -> Mask:
    """The mask function ``m`` that maps a weight ``lambda`` to its loss multiplier.

    The paper asks for ``m`` non-negative, differentiable and strictly
    increasing on ``lambda >= 0``, so that ascent (gradient ``m'(lambda) r^2``)
    only ever raises the weights:

    * ``"identity"``: ``m(lambda) = lambda``.
    * ``"polynomial"`` (default): ``m(lambda) = c lambda^q`` (the paper's
      polynomial masks; ``c = 1, q = 2`` is the authors' code, which squares
      ``lambda r``). Weights grow without bound.
    * ``"sigmoid"``: ``m(lambda) = c sigmoid(lambda)``, a saturating mask
      bounded by ``c`` (a logistic mask; ``q`` unused).
    * a callable ``lambda -> m(lambda)``, used as given.

    Args:
      name: one of :data:`SA_MASKS` or a callable.
      c: positive scale.
      q: positive power of ``"polynomial"``.

    Raises:
      ValueError: an unknown name, or ``c`` / ``q`` not positive and finite.
    """
    if callable(name):
        return name
    check_choice(name, "mask", SA_MASKS)
    c = check_float(c, "c", low=0.0, low_open=True)
    q = check_float(q, "q", low=0.0, low_open=True)
    if name == "identity":
        return lambda lam: lam
    if name == "polynomial":
        return lambda lam: c * lam**q
    return lambda lam: c * jax.nn.sigmoid(lam)


def sa_init(
    num_points: Mapping[str, int],
    *,
    init: float | Mapping[str, float] = 1.0,
    key: jax.Array | None = None,
    dtype: Any = None,
) -> SelfAdaptiveState:
    """The initial weights: ``init`` everywhere, or uniform in ``[0, init)`` draws with ``key``.

    The paper's examples start from constants (the authors' Burgers run:
    100 on the collocation points) or from uniform draws in ``[0, 1)`` (its
    initial-condition points).

    Args:
      num_points: term name -> number of points of that term.
      init: the initial value (``>= 0``, so that polynomial masks are defined),
        one for all terms or a mapping per term.
      key: if given, each term's weights are drawn uniformly in ``[0, init)``
        (a key split per term, in sorted term order).
      dtype: float dtype; default float64 under x64, else float32.

    Raises:
      ValueError: an empty mapping, a count not a positive integer, an
        ``init`` negative, not finite or missing a term.
    """
    if not isinstance(num_points, Mapping) or not num_points:
        raise ValueError(f"`num_points` must be a non-empty mapping term -> int; got {num_points!r}.")
    terms = sorted(num_points)
    counts = {t: check_positive_int(num_points[t], f"num_points[{t!r}]") for t in terms}
    if isinstance(init, Mapping):
        missing = [t for t in terms if t not in init]
        if missing:
            raise ValueError(f"`init` has no value for the terms {missing}.")
        values = {t: check_float(init[t], f"init[{t!r}]", low=0.0) for t in terms}
    else:
        values = dict.fromkeys(terms, check_float(init, "init", low=0.0))
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if key is None:
        return SelfAdaptiveState({t: jnp.full((counts[t],), values[t], dtype) for t in terms})
    keys = jax.random.split(key, len(terms))
    return SelfAdaptiveState(
        {t: values[t] * jax.random.uniform(k, (counts[t],), dtype) for t, k in zip(terms, keys, strict=True)}
    )


def sa_loss(
    residuals: Mapping[str, Any], state: SelfAdaptiveState | None, *, mask: str | Mask = "polynomial"
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``sum_terms mean_i m(lambda_i) r_i^2`` and the per-term losses.

    Terms of ``residuals`` without weights in ``state`` (or all, with
    ``state=None``) enter unweighted, as ``mean r^2`` (e.g. a data term that
    is not self-adaptive). A residual may carry trailing axes (several
    outputs at one point): its point's weight multiplies all of them.

    Args:
      residuals: term -> ``[N_term, ...]`` point-wise residuals.
      state: the weights (traced: differentiate with respect to it).
      mask: a name of :func:`sa_mask` (its defaults) or a callable mask.

    Returns:
      ``(total, {term: loss})``, scalars in the residuals' dtype. Non-finite
      residuals give a non-finite loss and gradients (see :func:`sa_optimizer`
      for what the step then does).

    Raises:
      ValueError: ``residuals`` empty, a weighted term's residual of the
        wrong length, or weights for a term absent from ``residuals``.
    """
    if not isinstance(residuals, Mapping) or not residuals:
        raise ValueError(
            f"`residuals` must be a non-empty mapping term -> array; got {type(residuals).__name__}."
        )
    m = sa_mask(mask)
    weights = {} if state is None else state.weights
    extra = sorted(set(weights) - set(residuals))
    if extra:
        raise ValueError(
            f"`state` has weights for terms {extra} that are not in `residuals` {sorted(residuals)}."
        )
    per_term = {}
    for term in sorted(residuals):
        r = jnp.asarray(residuals[term])
        sq = r**2
        if term in weights:
            lam = jnp.asarray(weights[term])
            if r.ndim == 0 or lam.shape != r.shape[:1]:
                raise ValueError(
                    f"residuals[{term!r}] must be [N, ...] with N = {lam.shape[0]} (its weights); "
                    f"got shape {r.shape}."
                )
            sq = jnp.reshape(m(lam), lam.shape + (1,) * (r.ndim - 1)) * sq
        per_term[term] = jnp.mean(sq)
    total = sum(per_term.values())
    return total, per_term


def sa_ascent(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` stepping *up* the gradient: it receives ``-grad`` (so Adam's step is ascent too)."""
    return optax.chain(optax.scale(-1.0), optimizer)


def sa_optimizer(
    net_optimizer: optax.GradientTransformation,
    weight_optimizer: optax.GradientTransformation,
    *,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformation:
    """One optax transform for ``{"net": params, "sa": SelfAdaptiveState}``: descent on net, ascent on sa.

    ``update(grads, state, params)`` takes the gradient of the SA loss with
    respect to the whole pytree (one ``jax.grad``), steps ``"net"`` with
    ``net_optimizer`` and ``"sa"`` with ``sa_ascent(weight_optimizer)``: the
    paper's simultaneous update (both gradients at the same point). With
    ``optax.sgd`` on both it is exactly the paper's
    ``w - eta_w dL/dw, lambda + eta_lambda dL/dlambda``.

    Non-finite gradients (a NaN residual) would turn the weights NaN for good:
    with ``skip_nonfinite`` (default) such a step is skipped whole (zero
    updates, optimizer states kept) by ``optax.apply_if_finite``, which counts
    it in its state's ``notfinite_count``.

    Args:
      net_optimizer: the network's optimizer (descent).
      weight_optimizer: the weights' optimizer, given as for descent (e.g.
        ``optax.adam(lr)``); its sign is flipped here.
      skip_nonfinite: skip steps with a non-finite gradient.

    Raises:
      ValueError: ``skip_nonfinite`` not a bool.
    """
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"`skip_nonfinite` must be a bool, got {skip_nonfinite!r}.")
    tx = optax.multi_transform(
        {"net": net_optimizer, "sa": sa_ascent(weight_optimizer)}, {"net": "net", "sa": "sa"}
    )
    if skip_nonfinite:
        # Never give up: past max_consecutive_errors apply_if_finite would apply the NaN step.
        tx = optax.apply_if_finite(tx, max_consecutive_errors=np.iinfo(np.int32).max)
    return tx
