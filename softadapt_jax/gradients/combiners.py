"""PCGrad, MGDA and CAGrad with LibMTL's defaults: optax transforms and Gramian weight rules.

Each transform is a shortcut for the registry aggregator of the method in
LibMTL's convention (median-research-group/LibMTL, git 4336804,
``LibMTL/weighting/{PCGrad,MGDA,CAGrad}.py``, which for these three follows
the papers' released code) driven by the one optax adapter::

    pcgrad(seed, **o)  == aggregate(aggregators.pcgrad.pcgrad(convention="libmtl", ...), seed=seed, ...)
    mgda(**o)          == aggregate(aggregators.mgda.mgda(convention="libmtl", ...), ...)
    cagrad(c, **o)     == aggregate(aggregators.cagrad.cagrad(c=c, convention="libmtl", ...), ...)

so ``updates`` are per-component gradients stacked on a leading axis K (the
output of :func:`~softadapt_jax.gradients.per_component_grads`), ``mask``
marks the shared leaves (masked-out, task-specific leaves get the plain sum
over K), ``axis_name`` averages the gradients over a ``pmap`` axis *before*
combining (combining is non-linear), and the coefficients come from the
Gramian of the gradients scaled by a power of two
(:mod:`softadapt_jax.gradients.aggregators.optax_adapter`), which keeps the
update finite for gradients of any size. Every method, its conventions and
its original implementations are documented in its aggregator module
(:mod:`~softadapt_jax.gradients.aggregators.pcgrad`,
:mod:`~softadapt_jax.gradients.aggregators.mgda`,
:mod:`~softadapt_jax.gradients.aggregators.cagrad`); ``convention="torchjd"``
gives torchjd 0.18.0's form.

The weight rules (:func:`pcgrad_weights`, :func:`mgda_weights`,
:func:`cagrad_weights`) are pure functions of the ``[K, K]`` Gramian with the
same defaults, for the route that never stacks the gradients: Gramian from
``gramian(..., method="sequential", scaled=True)``, then one weighted VJP.
On the scaled Gramian ``G_hat`` the coefficients equal the unscaled ones for
every rule except MGDA's ``w / n`` with the norm-based normalisers (``"l2"``,
``"loss+"``), which must be multiplied by ``2**-e``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import numpy as np
import optax

from softadapt_jax._checks import check_choice, check_positive_int
from softadapt_jax.gradients.aggregators import cagrad as _cagrad
from softadapt_jax.gradients.aggregators import mgda as _mgda
from softadapt_jax.gradients.aggregators import pcgrad as _pcgrad
from softadapt_jax.gradients.aggregators.cagrad import (
    CAGRAD_RESCALES,  # noqa: F401 (public, re-exported)
    cagrad_coefficients,  # noqa: F401 (public, re-exported)
    cagrad_dual_problem,  # noqa: F401 (public, re-exported)
)
from softadapt_jax.gradients.aggregators.mgda import (
    MGDA_COMBINES,
    MGDA_CONVENTIONS,
    MGDA_NORMALIZATIONS,
    mgda_normalizers,  # noqa: F401 (public, re-exported)
    normalize_gramian,  # noqa: F401 (public, re-exported)
)
from softadapt_jax.gradients.aggregators.optax_adapter import AggregateState, aggregate
from softadapt_jax.gradients.aggregators.pcgrad import pcgrad_weights  # noqa: F401 (public, re-exported)
from softadapt_jax.gradients.per_component import Mask

CONVENTIONS = ("libmtl", "torchjd")

PCGradState = AggregateState
"""State of :func:`pcgrad`: the optax adapter's, whose ``key`` (raw ``uint32[2]``) draws the orders."""


def pcgrad(
    seed: int = 0,
    *,
    random_order: bool = True,
    convention: str = "libmtl",
    mask: Mask = None,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """PCGrad, gradient surgery (Yu et al. 2020, arXiv:2001.06782), as an optax transform.

    For every component i, ``g_i^PC`` starts at ``g_i`` and is projected in
    turn onto the normal plane of each original ``g_j`` it conflicts with
    (``<g_i^PC, g_j> < 0``)::

        g_i^PC <- g_i^PC - <g_i^PC, g_j> / (||g_j||^2 + eps) * g_j

    visiting the j's in a random order drawn afresh for every i and every
    step; the update is the SUM ``sum_i g_i^PC`` (not the mean), computed from
    the Gramian (:func:`pcgrad_weights`). ``"libmtl"`` (default): the order
    is a shuffle of all K components, i included, and ``eps = 1e-8``;
    ``"torchjd"``: ``j = i`` is skipped and ``eps = 0``
    (:mod:`softadapt_jax.gradients.aggregators.pcgrad`).

    Args:
      seed: seeds ``jax.random.PRNGKey(seed)``, kept in the state and split
        every step (so replicas under pmap draw the same orders).
      random_order: if False, every i visits j = 0..K-1 in order (deterministic).
      convention: ``"libmtl"`` (default) or ``"torchjd"``.
      mask: optax-style mask of shared parameters (module docstring).
      axis_name: pmap axis to average the gradients over before combining.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra arguments such as
      ``losses`` are accepted and ignored.

    Example:
      >>> import optax
      >>> from softadapt_jax.gradients import pcgrad, per_component_grads
      >>> tx = optax.chain(pcgrad(seed=0), optax.adam(1e-3))
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int, got {seed!r}.")
    _check_bool(random_order, "random_order")
    check_choice(convention, "convention", CONVENTIONS)
    agg = _pcgrad.pcgrad(convention=convention, random_order=random_order)
    return aggregate(agg, mask=mask, axis_name=axis_name, seed=int(seed))


def mgda(
    *,
    normalization: str = "none",
    convention: str = "libmtl",
    combine: str = "normalized",
    max_iters: int | None = None,
    tol: float | None = None,
    mask: Mask = None,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """MGDA, multiple-gradient descent (Sener & Koltun 2018, arXiv:1810.04650), as an optax transform.

    The update is (an approximation of) the minimum-norm point of the convex
    hull of the (normalised) gradients ``u_k = g_k / n_k``::

        w = argmin_{w in simplex} ||sum_k w_k u_k||^2,    d = sum_k w_k u_k

    which has a non-negative inner product with every ``u_k``
    (``<d, u_k> >= ||d||^2``), so no component's loss increases to first
    order. Note ``d`` is a convex combination (weights sum to 1), about K
    times smaller than the plain sum.

    ``n_k`` is 1 (``"none"``), ``||g_k||`` (``"l2"``), ``L_k`` (``"loss"``)
    or ``L_k ||g_k||`` (``"loss+"``); the loss-based forms need
    ``update(..., losses=losses)`` and assume positive losses. A zero gradient
    (or loss) is normalised to zero (``n_k`` is floored at 1e-20, so 0/0
    reads as 0), where LibMTL gives NaN. Solvers: ``"libmtl"`` (default,
    LibMTL's ``_find_min_norm_element`` iteration for iteration, the authors'
    solver), ``"torchjd"`` (Frank-Wolfe) or ``"exact"``; ``combine``:
    ``"normalized"`` (default, ``d = sum_k w_k g_k / n_k``, LibMTL) or
    ``"raw"`` (``d = sum_k w_k g_k``). All are described in
    :mod:`softadapt_jax.gradients.aggregators.mgda`.

    Finite for finite gradients, of any size, except that ``"loss"`` divides
    the scaled Gramian by ``L_i L_j``: for gradients at or above the scaling
    bound it stays finite while the losses exceed about ``sqrt(P) 2**-32``
    (P the shared entries per component). LibMTL's K >= 3 iteration is not
    invariant to the scale of the gradients (its step thresholds are
    absolute) and above the bound behaves as for the gradients scaled down to
    it.

    Args:
      normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"``.
      convention: ``"libmtl"`` (default), ``"torchjd"`` or ``"exact"``.
      combine: ``"normalized"`` (default) or ``"raw"``.
      max_iters: iteration cap of the solver (static); ``None``: the
        convention's own (250, 100, 250).
      tol: the solver's stopping tolerance; ``None``: the convention's own
        (1e-5, 1e-3, 1e-6).
      mask: optax-style mask of shared parameters.
      axis_name: pmap axis to average the gradients over before combining.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``losses`` (``[K]``) is
      read by the loss-based normalisations, other extra arguments ignored.

    Raises:
      ValueError: at construction, a bad option; at ``update`` (trace time),
        a loss-based normalisation without ``losses`` of shape ``[K]``.

    Example:
      >>> import optax
      >>> from softadapt_jax.gradients import mgda
      >>> tx = optax.chain(mgda(normalization="loss+"), optax.adam(1e-3))
      >>> # updates, state = tx.update(stacked_grads, state, params, losses=losses)
    """
    check_choice(normalization, "normalization", MGDA_NORMALIZATIONS)
    check_choice(combine, "combine", MGDA_COMBINES)
    max_iters, tol = _mgda_solver_options(convention, max_iters, tol)
    agg = _mgda._build(
        convention=convention, max_iters=max_iters, tol=tol, normalization=normalization, combine=combine
    )
    return aggregate(agg, mask=mask, axis_name=axis_name)


def cagrad(
    c: float = 0.5,
    *,
    convention: str = "libmtl",
    rescale: str | None = None,
    max_iters: int = 200,
    tol: float = 1e-12,
    mask: Mask = None,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """CAGrad, conflict-averse gradient descent (Liu et al. 2021, arXiv:2110.14048), as an optax transform.

    With the average gradient ``g0 = (1/K) sum_k g_k`` and
    ``sqrt(phi) = c ||g0||``, CAGrad solves the dual over the simplex::

        w = argmin_{w in simplex}  <g_w, g0> + sqrt(phi) ||g_w||,   g_w = sum_k w_k g_k

    and returns ``d = (g0 + sqrt(phi) / ||g_w|| * g_w) / rescale``: before
    rescaling, the update within the ball ``||d - g0|| <= c ||g0||`` that
    maximises the worst component's first-order improvement. ``g0`` is the
    *mean*, not the sum. ``"libmtl"`` (default) keeps the authors' guards
    (``sqrt(phi) = c sqrt(mean(G) + 1e-8) + 1e-8``, step
    ``sqrt(phi) / (||g_w|| + 1e-8)``) and ``rescale="1+c^2"``; ``"torchjd"``
    divides the Gramian by its trace, returns zeros where a convex combination
    of the gradients vanishes, and does not rescale
    (:mod:`softadapt_jax.gradients.aggregators.cagrad`). The dual is solved
    by an interior-point method to a duality gap of ``tol``
    (:func:`cagrad_weights`).

    Args:
      c: the radius ``c >= 0`` of the ball around ``g0`` (``c = 0``: the mean).
      convention: ``"libmtl"`` (default) or ``"torchjd"``.
      rescale: ``"1+c^2"``, ``"1+c"`` (the authors' ``rescale=2``; a single
        component then gives its gradient), ``"none"``, or ``None`` for the
        convention's own (``"1+c^2"`` for LibMTL, ``"none"`` for torchjd).
      max_iters: cap on the Newton steps of the dual solver (static, for jit).
      tol: the duality gap to reach (floored at 64 machine epsilons).
      mask: optax-style mask of shared parameters.
      axis_name: pmap axis to average the gradients over before combining.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments ignored).
    """
    c = _check_nonneg_float(c, "c")
    rescale = _cagrad._rescale(convention, rescale)
    check_positive_int(max_iters, "max_iters")
    tol = _check_nonneg_float(tol, "tol")
    agg = _cagrad.cagrad(c=c, convention=convention, rescale=rescale, max_iters=max_iters, tol=tol)
    return aggregate(agg, mask=mask, axis_name=axis_name)


def mgda_weights(
    gram: jax.Array,
    *,
    convention: str = "libmtl",
    max_iters: int | None = None,
    tol: float | None = None,
) -> jax.Array:
    """MGDA's weights: (an approximation of) ``argmin_{w in simplex} w^T G w``.

    The solver of each convention is described in
    :mod:`softadapt_jax.gradients.aggregators.mgda`. K = 1 gives ``[1]``
    under every convention (LibMTL's pair search fails there).

    * ``"libmtl"``: LibMTL's ``_find_min_norm_element``. Its pair search starts
      from a cost bound of 1e8 and fails when every pair costs more; here the
      best pair is taken whatever its cost. The iterate sits within about
      ``tol`` (L1) of the minimiser, and a clamped pair weight of 0.999 where
      the minimiser is a vertex.
    * ``"torchjd"``: torchjd's Frank-Wolfe, accurate only to about ``tol``.
    * ``"exact"``: the minimiser, to float precision. The Gramian is divided by
      its largest diagonal entry first, which keeps ``tol`` scale-free.

    Args:
      gram: ``[K, K]`` Gramian (symmetric PSD), already normalised if wanted
        (:func:`normalize_gramian`).
      convention: ``"libmtl"`` (default), ``"torchjd"`` or ``"exact"``.
      max_iters: iteration cap (static); ``None``: the convention's own.
      tol: stopping tolerance; ``None``: the convention's own.

    Returns:
      ``[K]`` weights on the simplex (non-negative, summing to 1).
    """
    max_iters, tol = _mgda_solver_options(convention, max_iters, tol)
    return _mgda._min_norm_weights(gram, convention=convention, max_iters=max_iters, tol=tol)


def cagrad_weights(
    gram: jax.Array,
    c: float | jax.Array = 0.5,
    *,
    convention: str = "libmtl",
    rescale: str | None = None,
    max_iters: int = 200,
    tol: float = 1e-12,
) -> jax.Array:
    """CAGrad's coefficients: ``d = sum_k coef_k g_k`` (see :func:`cagrad`).

    Solves the dual for ``w`` (:func:`cagrad_dual_problem` gives the problem
    each convention poses) with a log-barrier interior-point method, then
    applies :func:`cagrad_coefficients`. The duality gap of ``w`` is below
    ``tol`` (floored at 64 machine epsilons) on the problem divided by the
    largest diagonal entry of its Gramian; the references' solvers stop
    earlier (:mod:`softadapt_jax.gradients.aggregators.cagrad`).

    Args:
      gram: ``[K, K]`` Gramian.
      c: the ball radius (may be a traced scalar).
      convention: ``"libmtl"`` (default) or ``"torchjd"``.
      rescale: ``"1+c^2"``, ``"1+c"``, ``"none"`` or ``None`` (the convention's own).
      max_iters: cap on the Newton steps of the dual solver (static).
      tol: the duality gap to reach.

    Returns:
      ``[K]`` coefficients (not on the simplex).
    """
    rescale = _cagrad._rescale(convention, rescale)
    options = {"convention": convention, "rescale": rescale, "max_iters": max_iters, "tol": tol}
    return _cagrad._coefficients(gram, c, **options)


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}.")


def _check_nonneg_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"`{name}` must be a non-negative float, got {value!r}.")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite float >= 0, got {value!r}.")
    return float(value)


def _mgda_solver_options(convention: str, max_iters: int | None, tol: float | None) -> tuple[int, float]:
    # Each solver's own defaults for None: LibMTL's MAX_ITER/STOP_CRIT, torchjd's max_iters/epsilon.
    check_choice(convention, "convention", MGDA_CONVENTIONS)
    default_iters, default_tol = _mgda._SOLVER_DEFAULTS[convention]
    max_iters = default_iters if max_iters is None else check_positive_int(max_iters, "max_iters")
    tol = default_tol if tol is None else _check_nonneg_float(tol, "tol")
    return max_iters, tol
