"""PCGrad, MGDA and CAGrad as optax transforms over stacked per-component gradients.

Each transform takes ``updates`` whose leaves are ``[K, ...]`` (the output of
:func:`~softadapt_jax.gradients.per_component_grads`) and returns one update
with the parameters' shapes. All three combine the K gradients linearly,
``d = sum_k c_k g_k``, with coefficients ``c`` that depend on the gradients only
through their Gramian ``G_ij = <g_i, g_j>``; so each method is split, as in
torchjd, into a pure weight rule on the ``[K, K]`` Gramian
(:func:`pcgrad_weights`, :func:`mgda_weights`, :func:`cagrad_weights`, at the
bottom of this file) and the linear combination. The weight rules can also be
used without ever stacking the gradients: Gramian from
``gramian(..., method="sequential")``, then one weighted VJP. For gradients
that may be large, give them ``G_hat`` from ``gramian(..., scaled=True)``
(below): the coefficients are then those of the scaled gradients
``2**-e g_k``, which equal the unscaled ones for every rule except MGDA's
``w / n`` with the norm-based normalisers (``"l2"``, ``"loss+"``), which
must be multiplied by ``2**-e``.

Every method reproduces LibMTL (median-research-group/LibMTL, git 4336804,
``LibMTL/weighting/{PCGrad,MGDA,CAGrad}.py``) by default, which for these
three follows the papers' released code, and torchjd 0.18.0
(``torchjd/aggregation/_{pcgrad,mgda,cagrad}.py``) with
``convention="torchjd"``; each factory's docstring lists the differences.

Common options:

* ``mask`` (optax-style): only masked-in leaves (shared parameters) enter the
  Gramian and get the combined update; masked-out leaves (task-specific
  parameters, which only one loss touches) get the plain sum over K.
* ``axis_name``: under ``jax.pmap``, the per-device per-component gradients are
  averaged with ``lax.pmean`` over this axis *before* combining. Combining is
  non-linear, so averaging afterwards would give a different (and
  replica-dependent) answer; averaging first gives every replica the update of
  the global batch.

Large gradients: the transforms form the Gramian of the gradients scaled by
a power of two, ``2**-e``, and the update from the scaled gradients,
multiplied back by ``2**e`` (``stacked_gramian(..., scaled=True)``). ``e = 0``
unless the largest shared entry reaches ``2**32`` or is below ``2**-33``
(float32; ``2**256`` and ``2**-257`` in float64), and a power of two changes
no rounding, so in that range everything is the plain computation, bit for
bit. Outside it the weight rules see the gradients scaled to just inside it:
their scale-invariant parts are unaffected, and their absolute constants
(LibMTL's 1e-8 guards and MGDA step thresholds, torchjd's trace threshold)
act on that scale: above the range they are negligible next to the largest
gradient; below it they weigh as on gradients at its lower end (tiny
gradients are scaled up so that their Gramian does not underflow to 0, which
would make every rule see zero gradients). Guaranteed: finite updates for
finite gradients wherever the update is representable (the one exception is
noted under :func:`mgda`'s ``"loss"``); components whose norm is below about
``2**-94`` times the largest entry (in float32) then count as zero gradients,
their squared norms underflowing.

Everything is jit- and vmap-safe: the solvers use ``lax.while_loop`` with a
static iteration cap, and no Python control flow depends on values.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softadapt_jax._checks import check_choice, check_positive_int, check_vector
from softadapt_jax.gradients.per_component import Mask, combine_leaves, scaled_gram_of_leaves, split_stacked

CONVENTIONS = ("libmtl", "torchjd")
MGDA_CONVENTIONS = ("libmtl", "torchjd", "exact")
CAGRAD_RESCALES = ("1+c^2", "1+c", "none")
MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
MGDA_COMBINES = ("normalized", "raw")

# Constants of the reference implementations, named after where they come from.
_LIBMTL_EPS = 1e-8  # LibMTL's PCGrad denominator and CAGrad's three guards
_LIBMTL_MGDA_ITERS, _LIBMTL_MGDA_TOL = 250, 1e-5  # MGDA's MAX_ITER and STOP_CRIT
_LIBMTL_MGDA_CLAMP = 0.999  # the two-point rule's weight when one vector dominates
_LIBMTL_MGDA_MIN_STEP = 1e-7  # step lengths at or below this are ignored by _next_point
_TORCHJD_MGDA_ITERS, _TORCHJD_MGDA_EPS = 100, 1e-3  # MGDA's max_iters and epsilon
_TORCHJD_NORM_EPS = 1e-4  # CAGrad's norm_eps: trace threshold and Pareto-stationary threshold
_EXACT_MGDA_ITERS, _EXACT_MGDA_TOL = 250, 1e-6
_NORM_FLOOR = 1e-20  # MGDA's normalisers: 0/0 is read as 0


class PCGradState(NamedTuple):
    """State of :func:`pcgrad`: the raw ``uint32[2]`` PRNG key drawing the projection orders."""

    key: jax.Array


def pcgrad(
    seed: int = 0,
    *,
    random_order: bool = True,
    convention: str = "libmtl",
    mask: Mask = None,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """PCGrad, gradient surgery (Yu et al. 2020, arXiv:2001.06782).

    For every component i, ``g_i^PC`` starts at ``g_i`` and is projected in
    turn onto the normal plane of each original ``g_j`` it conflicts with
    (``<g_i^PC, g_j> < 0``)::

        g_i^PC <- g_i^PC - <g_i^PC, g_j> / (||g_j||^2 + eps) * g_j

    visiting the j's in a random order drawn afresh for every i and every
    step; the update is the SUM ``sum_i g_i^PC`` (not the mean). Every
    projection subtracts a multiple of an original gradient, so the result is
    ``sum_k c_k g_k`` with ``c`` computed from the Gramian alone
    (:func:`pcgrad_weights`).

    Conventions (``convention=``):

    * ``"libmtl"`` (default): LibMTL's ``PCGrad.backward`` (git 4336804). The
      order is a shuffle of all K components, i included (a no-op unless the
      earlier projections turned ``g_i^PC`` against ``g_i``), and
      ``eps = 1e-8``. This is also the visiting rule of the authors' released
      code (every task is projected against the whole shuffled list), which
      is why it is the default.
    * ``"torchjd"``: torchjd 0.18.0's ``PCGrad`` (Algorithm 1 of the paper):
      ``j = i`` is skipped and ``eps = 0`` (a zero ``g_j`` has a zero inner
      product, so it is never divided by).

    Both return the sum; they differ only when ``||g_j||^2`` is comparable to
    1e-8 or when a projection turns ``g_i^PC`` against ``g_i``.

    Finite for finite gradients, of any size (module docstring). The
    ``"torchjd"`` coefficients are invariant to a common scale of the
    gradients; so are ``"libmtl"``'s, up to its 1e-8, which above the scaling
    bound applies to the scaled Gramian.

    Args:
      seed: seeds ``jax.random.PRNGKey(seed)``, kept in the state and split
        every step (so replicas under pmap draw the same orders).
      random_order: if False, every i visits j = 0..K-1 in order (deterministic).
      convention: ``"libmtl"`` (default) or ``"torchjd"``, see above.
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

    def init_fn(params: Any) -> PCGradState:
        del params
        return PCGradState(key=jax.random.PRNGKey(int(seed)))

    def weights_fn(gram: jax.Array, state: PCGradState, _: None) -> tuple[jax.Array, PCGradState]:
        k = gram.shape[0]
        if random_order:
            key, sub = jax.random.split(state.key)
            orders = _random_orders(sub, k)
        else:
            key = state.key
            orders = jnp.tile(jnp.arange(k), (k, 1))
        return pcgrad_weights(gram, orders, convention=convention), PCGradState(key=key)

    return _gramian_transform(init_fn, weights_fn, mask, axis_name)


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
    """MGDA, multiple-gradient descent (Sener & Koltun 2018, arXiv:1810.04650).

    The update is (an approximation of) the minimum-norm point of the convex
    hull of the (normalised) gradients ``u_k = g_k / n_k``::

        w = argmin_{w in simplex} ||sum_k w_k u_k||^2,    d = sum_k w_k u_k

    which has a non-negative inner product with every ``u_k``
    (``<d, u_k> >= ||d||^2``), so no component's loss increases to first
    order. Note ``d`` is a convex combination (weights sum to 1), about K
    times smaller than the plain sum.

    Gradient normalisation (Sener & Koltun's ``gradient_normalizers``):
    ``n_k`` is 1 (``"none"``), ``||g_k||`` (``"l2"``), ``L_k`` (``"loss"``)
    or ``L_k ||g_k||`` (``"loss+"``). The loss-based forms need the current
    losses, ``update(..., losses=losses)``, and assume positive losses.
    A zero gradient (or loss) is normalised to zero (``n_k`` is floored at
    1e-20, so 0/0 reads as 0) and then acts as in ``"none"``, where LibMTL
    gives NaN.

    Solvers (``convention=``), on the Gramian of the ``u_k``
    (:func:`mgda_weights`):

    * ``"libmtl"`` (default): LibMTL's ``MGDA._find_min_norm_element``
      (git 4336804), itself Sener & Koltun's ``MinNormSolver``, iteration for
      iteration: the best pair by the two-point rule (whose weight is clamped
      to 0.999/0.001 when one vector dominates, so for K = 2 a zero gradient
      gives ``0.001 u_other``), then for K >= 3 projected-gradient steps on
      the simplex (at most ``max_iters=250``), stopping when a step changes
      the weights by less than ``tol=1e-5`` (L1) and returning the iterate
      before that step. The default because our normalisations follow this
      code and it is the authors' solver.
    * ``"torchjd"``: torchjd 0.18.0's ``MGDAWeighting``: Frank-Wolfe from the
      uniform weights with exact line search, stopping when the step length
      is below ``tol=1e-3`` (its ``epsilon``) or after ``max_iters=100``; a
      zero gradient takes all the weight. torchjd has no normalisation; here
      it applies to the ``u_k`` like the other solvers.
    * ``"exact"`` (not a reference's convention): the exact minimiser, to
      float precision (closed form for K = 2; Frank-Wolfe with away steps and
      a final solve on the active face for K >= 3, ``max_iters=250``,
      ``tol=1e-6`` on the duality gap); uniform weights for all-zero
      gradients.

    ``combine`` says which vectors the weights multiply: ``"normalized"``
    (default, LibMTL's ``_backward_new_grads(sol, grads=normalised grads)``):
    ``d = sum_k w_k g_k / n_k``; ``"raw"`` (Sener & Koltun's training script,
    which back-propagates ``sum_k w_k L_k``): ``d = sum_k w_k g_k``. The two
    coincide for ``normalization="none"``.

    Finite for finite gradients, of any size (module docstring), except that
    ``"loss"`` divides the scaled Gramian by ``L_i L_j``: for gradients at or
    above the scaling bound it stays finite while the losses exceed about
    ``sqrt(P) 2**-32`` (P the shared entries per component). The
    ``"torchjd"`` and ``"exact"`` weights, and LibMTL's for K = 2, are
    invariant to a common scale of the gradients; LibMTL's K >= 3 iteration
    is not (its step thresholds are absolute) and above the bound behaves as
    for the gradients scaled down to it.

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

    def weights_fn(gram: jax.Array, state: Any, losses: jax.Array | None) -> tuple[jax.Array, Any]:
        if normalization == "none":
            return mgda_weights(gram, convention=convention, max_iters=max_iters, tol=tol), state
        n = mgda_normalizers(gram, normalization, losses)
        normalized = _divide_gramian(gram, n)
        w = mgda_weights(normalized, convention=convention, max_iters=max_iters, tol=tol)
        return (w / n if combine == "normalized" else w), state

    needs_losses = normalization in ("loss", "loss+")
    # w_k / n_k with n_k = ||2^-e g_k|| already carries the factor 2^e the scaled Gramian removed.
    by_norm = normalization in ("l2", "loss+") and combine == "normalized"
    return _gramian_transform(
        lambda _: optax.EmptyState(),
        weights_fn,
        mask,
        axis_name,
        needs_losses=needs_losses,
        rescale=not by_norm,
    )


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
    """CAGrad, conflict-averse gradient descent (Liu et al. 2021, arXiv:2110.14048).

    With the average gradient ``g0 = (1/K) sum_k g_k`` and
    ``sqrt(phi) = c ||g0||``, CAGrad solves the dual over the simplex::

        w = argmin_{w in simplex}  <g_w, g0> + sqrt(phi) ||g_w||,   g_w = sum_k w_k g_k

    and returns ``d = (g0 + sqrt(phi) / ||g_w|| * g_w) / rescale``: before
    rescaling, the update within the ball ``||d - g0|| <= c ||g0||`` that
    maximises the worst component's first-order improvement. ``g0`` is the
    *mean*, not the sum.

    Conventions (``convention=``):

    * ``"libmtl"`` (default): LibMTL's ``CAGrad.backward`` (git 4336804),
      which keeps the authors' code (Cranial-XIX/CAGrad) including its
      guards: ``sqrt(phi) = c sqrt(mean(G) + 1e-8) + 1e-8``, the objective's
      norm is ``sqrt(w^T G w + 1e-8)`` and the step is
      ``sqrt(phi) / (||g_w|| + 1e-8)``; ``rescale`` defaults to ``"1+c^2"``
      (their ``rescale=1``). The default because it is the authors' code.
    * ``"torchjd"``: torchjd 0.18.0's ``CAGradWeighting`` (``norm_eps=1e-4``):
      the Gramian is divided by its trace first (all zeros when the trace is
      below 1e-4), there are no other guards, the coefficients are all ZERO
      when ``||g_w|| < 1e-4`` on that scale (a convex combination of the
      gradients vanishes: Pareto-stationary), and ``rescale`` defaults to
      ``"none"``.

    ``rescale``: ``"1+c^2"`` (divides by ``1 + c^2``, keeping the step size
    comparable to that of ``g0`` across values of ``c``), ``"1+c"`` (the
    authors' ``rescale=2``; with a single component it gives ``g`` exactly)
    or ``"none"`` (``rescale=0``).

    Solver: the references solve the dual with scipy's SLSQP (LibMTL) or
    cvxpy/CLARABEL (torchjd), neither jittable; here a log-barrier
    interior-point method on the Gramian solves the same convex problem to a
    duality gap of ``tol``, so the references' own stopping tolerances bound
    the agreement. Deliberate difference: where SLSQP stops without solving
    the problem (its tolerance is absolute, 1e-6 on the objective, so with
    gradients far from unit scale it can return its starting point 1/K),
    this solver still returns the minimiser (:func:`cagrad_weights`).

    Finite for finite gradients, of any size (module docstring). The
    ``"torchjd"`` coefficients are invariant to a common scale of the
    gradients (its trace threshold 1e-4 aside); LibMTL's guards add 1e-8 to
    squared norms and norms, so its coefficients are invariant only where
    those are large next to 1e-8 (above the scaling bound, next to 1e-8 in
    the scaled units).

    Args:
      c: the radius ``c >= 0`` of the ball around ``g0`` (``c = 0``: the mean).
      convention: ``"libmtl"`` (default) or ``"torchjd"``, see above.
      rescale: ``"1+c^2"``, ``"1+c"``, ``"none"``, or ``None`` for the
        convention's own (``"1+c^2"`` for LibMTL, ``"none"`` for torchjd).
      max_iters: cap on the Newton steps of the dual solver (static, for jit).
      tol: the duality gap to reach (floored at 64 machine epsilons).
      mask: optax-style mask of shared parameters.
      axis_name: pmap axis to average the gradients over before combining.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments ignored).
    """
    c = _check_nonneg_float(c, "c")
    rescale = _cagrad_rescale(convention, rescale)
    check_positive_int(max_iters, "max_iters")
    tol = _check_nonneg_float(tol, "tol")

    def weights_fn(gram: jax.Array, state: Any, _: None) -> tuple[jax.Array, Any]:
        coef = cagrad_weights(gram, c, convention=convention, rescale=rescale, max_iters=max_iters, tol=tol)
        return coef, state

    return _gramian_transform(lambda _: optax.EmptyState(), weights_fn, mask, axis_name)


def _gramian_transform(
    init_fn: Callable[[Any], Any],
    weights_fn: Callable[[jax.Array, Any, jax.Array | None], tuple[jax.Array, Any]],
    mask: Mask,
    axis_name: Hashable | None,
    *,
    needs_losses: bool = False,
    rescale: bool = True,
) -> optax.GradientTransformationExtraArgs:
    # Shared by the three combiners: average over devices, split off task-specific leaves,
    # Gramian of the shared ones, coefficients, linear combination. The Gramian is that of
    # the gradients scaled by 2^-e (per_component.overflow_exponent), which the weight rules
    # are invariant to; `rescale=False` for coefficients that already carry 2^e (w / ||2^-e g||).
    def update_fn(
        updates: Any, state: Any, params: Any = None, *, losses: Any = None, **extra_args: Any
    ) -> tuple[Any, Any]:
        del extra_args
        if axis_name is not None:
            updates = jax.lax.pmean(updates, axis_name)
        shared, rebuild, k = split_stacked(updates, mask=mask, params=params)
        losses = _check_losses(losses, k) if needs_losses else None
        if losses is not None and axis_name is not None:
            losses = jax.lax.pmean(losses, axis_name)
        gram, exponent = scaled_gram_of_leaves(shared)
        weights, state = weights_fn(gram, state, losses)
        return rebuild(combine_leaves(weights, shared, exponent=exponent, rescale=rescale)), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_losses(losses: Any, k: int) -> jax.Array:
    if losses is None:
        raise ValueError(
            "this normalisation needs the current component losses: call "
            f"`update(updates, state, params, losses=losses)` with `losses` of shape ({k},)."
        )
    return jax.lax.stop_gradient(check_vector(losses, "losses", k))


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
    # Each solver's own defaults: LibMTL's MAX_ITER/STOP_CRIT, torchjd's max_iters/epsilon.
    check_choice(convention, "convention", MGDA_CONVENTIONS)
    default_iters, default_tol = {
        "libmtl": (_LIBMTL_MGDA_ITERS, _LIBMTL_MGDA_TOL),
        "torchjd": (_TORCHJD_MGDA_ITERS, _TORCHJD_MGDA_EPS),
        "exact": (_EXACT_MGDA_ITERS, _EXACT_MGDA_TOL),
    }[convention]
    max_iters = default_iters if max_iters is None else check_positive_int(max_iters, "max_iters")
    tol = default_tol if tol is None else _check_nonneg_float(tol, "tol")
    return max_iters, tol


def _cagrad_rescale(convention: str, rescale: str | None) -> str:
    check_choice(convention, "convention", CONVENTIONS)
    if rescale is None:
        return "1+c^2" if convention == "libmtl" else "none"
    return check_choice(rescale, "rescale", CAGRAD_RESCALES)


# --- pure weight rules on the Gramian -----------------------------------------------------------------


def _random_orders(key: jax.Array, num: int) -> jax.Array:
    """``[K, K]`` int array: row i is a random permutation of ``0..K-1`` (PCGrad's visiting order for i)."""
    keys = jax.random.split(key, num)
    return jax.vmap(lambda kk: jax.random.permutation(kk, num))(keys)


def pcgrad_weights(gram: jax.Array, orders: jax.Array, *, convention: str = "libmtl") -> jax.Array:
    """PCGrad's coefficients: ``sum_i g_i^PC = sum_k c_k g_k`` (see :func:`pcgrad`).

    ``g_i^PC`` is tracked as a coefficient vector ``a`` over the original
    gradients, so ``<g_i^PC, g_j> = (G a)_j`` needs only the Gramian.

    To replay a reference's random draws, pass its orders: torchjd's K
    ``torch.randperm(K)`` draws are the rows of ``orders`` as they are;
    LibMTL's ``random.shuffle`` results (the lists after shuffling, one per
    task i in order) likewise.

    Args:
      gram: ``[K, K]`` Gramian.
      orders: ``[K, K]`` ints; row i is a permutation of ``0..K-1``, the
        order in which ``g_i`` visits the j's.
      convention: ``"libmtl"`` (default: i itself is visited, ``eps = 1e-8``)
        or ``"torchjd"`` (i is skipped, ``eps = 0``).

    Returns:
      ``c``: ``[K]`` coefficients.
    """
    check_choice(convention, "convention", CONVENTIONS)
    k = gram.shape[0]
    eye = jnp.eye(k, dtype=gram.dtype)
    eps = _LIBMTL_EPS if convention == "libmtl" else 0.0
    skip_self = convention == "torchjd"

    def one(i: jax.Array, order: jax.Array) -> jax.Array:
        def step(a: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
            dot = a @ gram[:, j]
            den = gram[j, j] + eps
            # Only conflicting pairs are projected; a zero gradient g_j has dot == 0, so the
            # guard on den only keeps the unused branch finite.
            project = (dot < 0) & (den > 0)
            if skip_self:
                project = project & (j != i)
            coef = jnp.where(project, dot / jnp.where(den > 0, den, 1.0), 0.0)
            return a - coef * eye[j], None

        a, _ = jax.lax.scan(step, eye[i], order)
        return a

    return jnp.sum(jax.vmap(one)(jnp.arange(k), orders), axis=0)


def _min_norm_2(g11: jax.Array, g12: jax.Array, g22: jax.Array) -> jax.Array:
    """The exact two-point min-norm weight: ``argmin_{0<=t<=1} ||t u + (1 - t) v||^2``.

    With ``g11 = ||u||^2``, ``g12 = <u, v>``, ``g22 = ||v||^2``:
    ``t = clip((g22 - g12) / (g11 - 2 g12 + g22), 0, 1)``, and ``t = 1/2`` when
    ``u = v`` (every t is optimal; 1/2 keeps the rule symmetric).
    """
    den = g11 - 2.0 * g12 + g22
    t = jnp.where(den > 0, (g22 - g12) / jnp.where(den > 0, den, 1.0), 0.5)
    return jnp.clip(t, 0.0, 1.0)


def mgda_normalizers(gram: jax.Array, normalization: str, losses: jax.Array | None = None) -> jax.Array:
    """MGDA's gradient normalisers ``n_k`` (see :func:`mgda`), floored at 1e-20.

    Args:
      gram: ``[K, K]`` Gramian (its diagonal gives ``||g_k||^2``).
      normalization: ``"none"`` (ones), ``"l2"`` (``||g_k||``), ``"loss"``
        (``L_k``) or ``"loss+"`` (``L_k ||g_k||``).
      losses: ``[K]`` component losses, for the loss-based forms.

    Returns:
      ``[K]`` normalisers. With the Gramian route, LibMTL's update is
      ``sum_k w_k / n_k g_k`` with ``w = mgda_weights(normalize_gramian(...))``.
    """
    check_choice(normalization, "normalization", MGDA_NORMALIZATIONS)
    if normalization == "none":
        return jnp.ones(gram.shape[:1], gram.dtype)
    if normalization != "l2" and losses is None:
        raise ValueError(f"normalization={normalization!r} needs `losses`.")
    floor = jnp.asarray(_NORM_FLOOR, gram.dtype)
    # Floored after the square root: the square of the floor (1e-40) is subnormal, which XLA on
    # CPU flushes to 0 in float32, and a zero norm would make 0/0 of a zero gradient.
    norms = jnp.maximum(jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0)), floor)
    if normalization == "l2":
        return norms
    n = jnp.asarray(losses, gram.dtype)
    if normalization == "loss+":
        n = n * norms
    return jnp.maximum(n, floor)


def normalize_gramian(gram: jax.Array, normalization: str, losses: jax.Array | None = None) -> jax.Array:
    """The Gramian of the normalised gradients ``g_k / n_k``: ``G_ij / (n_i n_j)``.

    Args:
      gram: ``[K, K]`` Gramian.
      normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``
        (:func:`mgda_normalizers`).
      losses: ``[K]`` component losses, for the loss-based forms.

    Returns:
      The ``[K, K]`` normalised Gramian (``gram`` itself for ``"none"``).
    """
    if normalization == "none":
        return gram
    n = mgda_normalizers(gram, normalization, losses)
    return _divide_gramian(gram, n)


def _divide_gramian(gram: jax.Array, n: jax.Array) -> jax.Array:
    # G_ij / (n_i n_j), and 0 where the product of two floored normalisers (1e-40) is flushed to
    # 0: there |G_ij| <= n_i n_j is flushed too, and 0/0 would be nan.
    den = n[:, None] * n[None, :]
    return jnp.where(den > 0, gram / jnp.where(den > 0, den, 1.0), 0.0)


def mgda_weights(
    gram: jax.Array,
    *,
    convention: str = "libmtl",
    max_iters: int | None = None,
    tol: float | None = None,
) -> jax.Array:
    """MGDA's weights: (an approximation of) ``argmin_{w in simplex} w^T G w``.

    The solver of each convention is described in :func:`mgda`. K = 1 gives
    ``[1]`` under every convention (LibMTL's pair search fails there).

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
    k = gram.shape[0]
    dtype = gram.dtype
    if k == 1:
        return jnp.ones((1,), dtype)
    if convention == "libmtl":
        return _libmtl_min_norm(gram, max_iters, tol)
    if convention == "torchjd":
        return _torchjd_frank_wolfe(gram, max_iters, tol)
    scale = jnp.max(jnp.diag(gram))
    g = gram / jnp.where(scale > 0, scale, 1.0)
    if k == 2:
        t = _min_norm_2(g[0, 0], g[0, 1], g[1, 1])
        w = jnp.stack([t, 1.0 - t])
    else:
        w = _mgda_frank_wolfe(g, max_iters, tol)
        w = _polish_on_face(g, w)
    # All-zero gradients: every w is optimal; uniform keeps the rule permutation-equivariant.
    return jnp.where(scale > 0, w, jnp.full((k,), 1.0 / k, dtype)).astype(dtype)


def _libmtl_pair(v11: jax.Array, v12: jax.Array, v22: jax.Array) -> tuple[jax.Array, jax.Array]:
    # LibMTL's _min_norm_element_from2: weight on the first vector and the cost; when one
    # vector dominates, the weight is clamped to 0.999 / 0.001 instead of 1 / 0.
    first = v12 >= v11
    second = ~first & (v12 >= v22)
    den = jnp.where(first | second, 1.0, v11 + v22 - 2.0 * v12)
    gamma = (v22 - v12) / den
    clamp = jnp.asarray(_LIBMTL_MGDA_CLAMP, v11.dtype)
    weight = jnp.where(first, clamp, jnp.where(second, 1.0 - clamp, gamma))
    cost = jnp.where(first, v11, jnp.where(second, v22, v22 + gamma * (v12 - v22)))
    return weight, cost


def _libmtl_simplex_projection(y: jax.Array) -> jax.Array:
    # LibMTL's _projection2simplex: the threshold is the first partial mean (of the sorted
    # values, minus 1) that exceeds the next value, else the mean of all of them.
    # The projection commutes with adding a constant to every entry. Far outside the simplex
    # (a step of LibMTL's on a Gramian of large entries leaves it by about those entries) the
    # largest entry is subtracted first: otherwise `partial sum - 1` rounds the 1 away and the
    # result leaves the simplex. Iterates near the simplex are projected as LibMTL does.
    y = jnp.where(jnp.max(y) > 2.0, y - jax.lax.stop_gradient(jnp.max(y)), y)
    m = y.shape[0]
    s = jnp.sort(y)[::-1]
    tmax = (jnp.cumsum(s)[:-1] - 1.0) / jnp.arange(1, m, dtype=y.dtype)
    hit = tmax > s[1:]
    theta = jnp.where(jnp.any(hit), tmax[jnp.argmax(hit)], (jnp.sum(y) - 1.0) / m)
    return jnp.maximum(y - theta, 0.0)


def _libmtl_next_point(w: jax.Array, direction: jax.Array) -> jax.Array:
    # LibMTL's _next_point: move along the direction projected on sum(w) = const, as far as the
    # first face it reaches (ignoring steps <= 1e-7, at most 1), then project onto the simplex.
    k = w.shape[0]
    proj = direction - jnp.sum(direction) / k
    neg, pos = proj < 0, proj > 0
    safe = jnp.where(neg | pos, proj, 1.0)
    to_zero = jnp.where(neg, -w / safe, 0.0)
    to_one = jnp.where(pos, (1.0 - w) / safe, 0.0)
    ok_zero = neg & (to_zero > _LIBMTL_MGDA_MIN_STEP)
    ok_one = pos & (to_one > _LIBMTL_MGDA_MIN_STEP)
    inf = jnp.asarray(jnp.inf, w.dtype)
    t = jnp.where(jnp.any(ok_zero), jnp.min(jnp.where(ok_zero, to_zero, inf)), 1.0)
    t = jnp.where(jnp.any(ok_one), jnp.minimum(t, jnp.min(jnp.where(ok_one, to_one, inf))), t)
    return _libmtl_simplex_projection(proj * t + w)


def _libmtl_min_norm(g: jax.Array, max_iters: int, tol: float) -> jax.Array:
    k = g.shape[0]
    i, j = (jnp.asarray(a) for a in np.triu_indices(k, 1))
    weight, cost = _libmtl_pair(g[i, i], g[i, j], g[j, j])
    b = jnp.argmin(cost)  # the first cheapest pair, as LibMTL's strict '<' scan keeps it
    eye = jnp.eye(k, dtype=g.dtype)
    w0 = weight[b] * eye[i[b]] + (1.0 - weight[b]) * eye[j[b]]
    if k == 2:
        return w0

    def cond(carry: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        it, _, done = carry
        return (it < max_iters) & ~done

    def body(carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        it, w, _ = carry
        new = _libmtl_next_point(w, -(g @ w))
        # The quadratic forms are sums of elementwise products, as LibMTL computes them: the
        # two-point rule compares them, and a different rounding can pick another branch.
        t, _ = _libmtl_pair(_quad(w, w, g), _quad(w, new, g), _quad(new, new, g))
        cand = t * w + (1.0 - t) * new
        done = jnp.sum(jnp.abs(cand - w)) < tol
        # On convergence LibMTL returns the iterate before the last step.
        return it + 1, jnp.where(done, w, cand), done

    return jax.lax.while_loop(cond, body, (jnp.asarray(0), w0, jnp.asarray(False)))[1]


def _quad(u: jax.Array, v: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.sum(u[:, None] * v[None, :] * g)


def _torchjd_frank_wolfe(g: jax.Array, max_iters: int, tol: float) -> jax.Array:
    # torchjd's MGDAWeighting: Frank-Wolfe from 1/K towards the vertex of the smallest (G w)_t,
    # exact line search; it stops after a step shorter than tol (that step is kept).
    k = g.shape[0]
    eye = jnp.eye(k, dtype=g.dtype)

    def cond(carry: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        it, _, done = carry
        return (it < max_iters) & ~done

    def body(carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        it, w, _ = carry
        gw = g @ w
        t = jnp.argmin(gw)
        a, b, c = w @ g[:, t], w @ gw, g[t, t]
        den = jnp.where((c <= a) | (b <= a), 1.0, b + c - 2.0 * a)
        gamma = jnp.where(c <= a, 1.0, jnp.where(b <= a, 0.0, (b - a) / den))
        return it + 1, (1.0 - gamma) * w + gamma * eye[t], gamma < tol

    init = (jnp.asarray(0), jnp.full((k,), 1.0 / k, g.dtype), jnp.asarray(False))
    return jax.lax.while_loop(cond, body, init)[1]


def _mgda_frank_wolfe(g: jax.Array, max_iters: int, tol: float) -> jax.Array:
    k = g.shape[0]
    eye = jnp.eye(k, dtype=g.dtype)
    # Start from the best pair, as Sener & Koltun do: for two tasks it already is the answer.
    i, j = (jnp.asarray(a) for a in np.triu_indices(k, 1))
    t = _min_norm_2(g[i, i], g[i, j], g[j, j])
    cost = t**2 * g[i, i] + 2 * t * (1 - t) * g[i, j] + (1 - t) ** 2 * g[j, j]
    b = jnp.argmin(cost)
    w0 = t[b] * eye[i[b]] + (1 - t[b]) * eye[j[b]]

    def gap(w: jax.Array) -> jax.Array:
        grad = g @ w
        return w @ grad - jnp.min(grad)

    def cond(carry: tuple[jax.Array, jax.Array]) -> jax.Array:
        it, w = carry
        return (it < max_iters) & (gap(w) > tol)

    def body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        it, w = carry
        grad = g @ w
        wg = w @ grad
        s = jnp.argmin(grad)  # Frank-Wolfe vertex
        v = jnp.argmax(jnp.where(w > 0, grad, -jnp.inf))  # away vertex, within the support
        use_fw = (wg - grad[s]) >= (grad[v] - wg)
        d = jnp.where(use_fw, eye[s] - w, w - eye[v])
        step_max = jnp.where(use_fw, 1.0, w[v] / jnp.maximum(1.0 - w[v], 1e-30))
        dgd = d @ g @ d
        step = jnp.where(dgd > 0, -(d @ grad) / jnp.where(dgd > 0, dgd, 1.0), step_max)
        w = jnp.maximum(w + jnp.clip(step, 0.0, step_max) * d, 0.0)
        return it + 1, w / jnp.sum(w)

    _, w = jax.lax.while_loop(cond, body, (jnp.asarray(0), w0))
    return w


def _polish_on_face(g: jax.Array, w: jax.Array, rounds: int = 3) -> jax.Array:
    # On the optimal face S the KKT conditions are linear: G_S w_S = lambda 1, sum w_S = 1.
    # S is guessed from the near-optimal w: near-active gradients, or clearly positive weights;
    # a solution with negative entries shrinks S and is solved again. A fori_loop rather than an
    # unrolled Python loop: one linear solve to compile instead of `rounds`.
    grad = g @ w
    lam = w @ grad
    support = (grad <= lam + 1e-3 * jnp.maximum(jnp.abs(lam), 1e-6)) | (w > 1e-3)

    def body(_: int, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        support, best, best_f = carry
        both = support[:, None] & support[None, :]
        m = jnp.where(both, g, 0.0) + jnp.diag(jnp.where(support, 0.0, 1.0))
        x = jnp.where(support, jnp.linalg.solve(m, support.astype(g.dtype)), 0.0)
        total = jnp.sum(x)
        x = x / jnp.where(total != 0, total, 1.0)
        f = x @ g @ x
        ok = jnp.all(jnp.isfinite(x)) & jnp.all(x >= 0) & (total != 0) & (f <= best_f)
        return support & (x > 0), jnp.where(ok, x, best), jnp.where(ok, f, best_f)

    return jax.lax.fori_loop(0, rounds, body, (support, w, lam))[1]


def _project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of ``v`` onto the probability simplex (sort-based, permutation-equivariant)."""
    k = v.shape[0]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    idx = jnp.arange(1, k + 1, dtype=v.dtype)
    rho = jnp.max(jnp.where(u - css / idx > 0, jnp.arange(1, k + 1), 0))
    theta = css[rho - 1] / rho
    return jnp.maximum(v - theta, 0.0)


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
    applies :func:`cagrad_coefficients`.

    Accuracy: the duality gap of the returned ``w`` is below ``tol`` (floored
    at 64 machine epsilons) on the problem divided by the largest diagonal
    entry of its Gramian. The references' solvers stop earlier: SLSQP
    (LibMTL) when the objective changes by less than 1e-6 in absolute terms
    (so it may return its starting point 1/K when the Gramian's scale is far
    from 1, where this solver returns the minimiser), CLARABEL (torchjd) at
    a relative gap of 1e-8. Where a convex combination of the gradients
    nearly vanishes, LibMTL's step ``sqrt(phi) / (||g_w|| + 1e-8)`` divides
    by about 1e-8 and its update is set by the solver's last digits.

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
    rescale = _cagrad_rescale(convention, rescale)
    k = gram.shape[0]
    g, sqrt_phi, guard = cagrad_dual_problem(gram, c, convention=convention)
    w = jnp.ones((1,), gram.dtype) if k == 1 else _cagrad_dual(g, sqrt_phi, guard, max_iters, tol)
    return cagrad_coefficients(gram, w, c, convention=convention, rescale=rescale)


def cagrad_dual_problem(
    gram: jax.Array, c: float | jax.Array = 0.5, *, convention: str = "libmtl"
) -> tuple[jax.Array, jax.Array, float]:
    """The dual each convention solves: ``min_{w in simplex} w^T A b + s sqrt(w^T A w + e)``, ``b = 1/K``.

    Args:
      gram: ``[K, K]`` Gramian.
      c: the ball radius.
      convention: ``"libmtl"``: ``A = G``, ``s = c sqrt(mean(G) + 1e-8) + 1e-8``,
        ``e = 1e-8``; ``"torchjd"``: ``A = G / tr(G)`` (zeros when
        ``tr(G) < 1e-4``), ``s = c sqrt(mean(A))``, ``e = 0``.

    Returns:
      ``(A, s, e)``.
    """
    check_choice(convention, "convention", CONVENTIONS)
    c = jnp.asarray(c, gram.dtype)
    if convention == "libmtl":
        # LibMTL / the authors: every guard is absolute, on the raw Gramian.
        return gram, c * jnp.sqrt(jnp.mean(gram) + _LIBMTL_EPS) + _LIBMTL_EPS, _LIBMTL_EPS
    trace = jnp.trace(gram)
    a = jnp.where(trace < _TORCHJD_NORM_EPS, 0.0, gram / jnp.where(trace > 0, trace, 1.0))
    return a, c * jnp.sqrt(jnp.maximum(jnp.mean(a), 0.0)), 0.0


def cagrad_coefficients(
    gram: jax.Array,
    w: jax.Array,
    c: float | jax.Array = 0.5,
    *,
    convention: str = "libmtl",
    rescale: str | None = None,
) -> jax.Array:
    """CAGrad's coefficients from a dual solution ``w`` (:func:`cagrad_dual_problem`).

    ``coef = (1/K + lam w) / rescale`` with ``lam = s / (||g_w|| + 1e-8)``
    (``"libmtl"``, ``||g_w||^2 = w^T G w``) or ``lam = s / ||g_w||`` on the
    trace-normalised Gramian (``"torchjd"``), where torchjd returns all zeros
    when ``||g_w|| < 1e-4`` (Pareto-stationary).

    Args:
      gram: ``[K, K]`` Gramian.
      w: ``[K]`` dual weights on the simplex.
      c: the ball radius.
      convention: ``"libmtl"`` (default) or ``"torchjd"``.
      rescale: ``"1+c^2"``, ``"1+c"``, ``"none"`` or ``None`` (the convention's own).

    Returns:
      ``[K]`` coefficients.
    """
    rescale = _cagrad_rescale(convention, rescale)
    k = gram.shape[0]
    dtype = gram.dtype
    c = jnp.asarray(c, dtype)
    w = jnp.asarray(w, dtype)
    b = jnp.full((k,), 1.0 / k, dtype)
    a, sqrt_phi, _ = cagrad_dual_problem(gram, c, convention=convention)
    gw_norm = jnp.sqrt(jnp.maximum(w @ a @ w, 0.0))
    if convention == "libmtl":
        coef = b + sqrt_phi / (gw_norm + _LIBMTL_EPS) * w
    else:
        stationary = gw_norm < _TORCHJD_NORM_EPS
        coef = jnp.where(stationary, 0.0, b + sqrt_phi / jnp.where(stationary, 1.0, gw_norm) * w)
    if rescale == "1+c^2":
        coef = coef / (1.0 + c**2)
    elif rescale == "1+c":
        coef = coef / (1.0 + c)
    return coef.astype(dtype)


def _cagrad_dual(gram: jax.Array, sqrt_phi: jax.Array, guard: float, max_iters: int, tol: float) -> jax.Array:
    """``argmin_{w in simplex} w^T G b + sqrt_phi sqrt(w^T G w + guard)``, ``b = 1/K``.

    A log-barrier interior-point method on the cone form of the problem:
    minimise ``t (w^T G b + sqrt_phi z) - log(z^2 - rho) - sum_i log w_i``
    with ``rho = w^T G w + guard``, ``sum(w) = 1``, raising ``t`` tenfold
    whenever the iterate is centred, until the duality gap ``(K + 2) / t`` is
    below ``tol`` (on the problem divided by the largest diagonal entry of
    ``G``). The minimisation over ``z`` has a closed form: with
    ``a = t sqrt_phi`` and ``S = sqrt(1 + a^2 rho)`` the barrier is
    ``t w^T G b + S - log(1 + S) - sum_i log w_i`` (up to a constant), which
    is smooth even where ``g_w = 0`` (the kink of the norm). Its Newton steps
    are invariant to linear changes of variables, so rows of very different
    scales do not slow it down as they do first-order methods.
    """
    k = gram.shape[0]
    dtype = gram.dtype
    b = jnp.full((k,), 1.0 / k, dtype)
    # Dividing by s = max diag(G) leaves the minimiser unchanged if sqrt_phi and the guard are
    # rescaled too: f/s = w^T G' b + sqrt_phi/sqrt(s) sqrt(w^T G' w + guard/s).
    scale = jnp.max(jnp.diag(gram))
    positive = scale > 0
    s = jnp.where(positive, scale, 1.0)
    g = gram / s
    fine = float(jnp.finfo(dtype).eps)
    # A zero radius (c = 0) would leave the cone term flat; a floor of sqrt(machine epsilon)
    # changes the objective by less than its rounding.
    sp = jnp.maximum(sqrt_phi / jnp.sqrt(s), np.sqrt(fine))
    eps = guard / s
    q = g @ b
    t_final = (k + 2) / max(tol, 64.0 * fine)
    halvings = 0.5 ** jnp.arange(40, dtype=dtype)  # candidate step lengths of the line search

    def barrier(w: jax.Array, t: jax.Array) -> jax.Array:  # w: [..., K]
        rho = jnp.maximum(jnp.einsum("...i,ij,...j->...", w, g, w) + eps, 0.0)
        root = jnp.sqrt(1.0 + (t * sp) ** 2 * rho)
        logs = jnp.sum(jnp.log(jnp.where(w > 0, w, 1.0)), axis=-1)
        value = t * (w @ q) + root - jnp.log1p(root) - logs
        return jnp.where(jnp.all(w > 0, axis=-1), value, jnp.inf)

    def newton_step(w: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        gw = g @ w
        a2 = (t * sp) ** 2
        root = jnp.sqrt(1.0 + a2 * jnp.maximum(w @ gw + eps, 0.0))
        d1 = a2 / (2.0 * (1.0 + root))  # first and second derivatives of the cone term in rho
        d2 = -(a2**2) / (4.0 * root * (1.0 + root) ** 2)
        grad = t * q + 2.0 * d1 * gw - 1.0 / w
        # A multiple of 1 in the gradient only changes the multiplier of sum(w) = 1: removing
        # the weighted mean leaves a vector that vanishes at the central point, so the step is
        # not the small difference of large terms (which jit's reassociation would spoil).
        grad = grad - w @ grad
        # Newton step on sum(w) = 1, in the variables y_i = x_i / w_i, where the barrier's
        # Hessian is I + W H W: dx = -H^-1 (grad + nu 1) with sum(dx) = 0.
        m = (2.0 * d1 * g + 4.0 * d2 * jnp.outer(gw, gw)) * jnp.outer(w, w) + jnp.eye(k, dtype=dtype)
        sol = _spd_solve(m, jnp.stack([w * grad, w], axis=1)) * w[:, None]
        nu = -jnp.sum(sol[:, 0]) / jnp.sum(sol[:, 1])
        dx = -(sol[:, 0] + nu * sol[:, 1])
        return dx, -(grad @ dx)  # the step and the squared Newton decrement

    def cond(carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
        it, _, _, done = carry
        return (it < max_iters) & ~done

    def body(carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> tuple[Any, ...]:
        it, w, t, _ = carry
        dx, decrement = newton_step(w, t)
        dx = jnp.where(jnp.all(jnp.isfinite(dx)), dx, 0.0)
        # The best of the halvings of the full step; infeasible trial points have an infinite barrier.
        trial = w + halvings[:, None] * dx
        values = barrier(trial, t)
        best = jnp.argmin(values)
        current = barrier(w, t)
        gain = current - values[best]
        w = jnp.where(gain > 0, trial[best] / jnp.sum(trial[best]), w)
        # Centred: a small Newton decrement, or no gain beyond the barrier's rounding.
        centred = (decrement < 1e-9) | (gain <= 64.0 * fine * (jnp.abs(current) + 1.0))
        done = centred & (t >= t_final)
        return it + 1, w, jnp.where(centred & ~done, 10.0 * t, t), done

    init = (jnp.asarray(0), b, jnp.asarray(1.0, dtype), jnp.asarray(False))
    w = jax.lax.while_loop(cond, body, init)[1]
    return jnp.where(positive, w, b)


def _spd_solve(m: jax.Array, rhs: jax.Array) -> jax.Array:
    """``m^-1 rhs`` for a small symmetric positive definite ``m`` with eigenvalues >= 1.

    Gauss-Jordan elimination without pivoting, which is stable here: every pivot is a Schur
    complement of ``m``, so at least 1. A ``fori_loop`` of rank-one updates compiles in a
    fraction of the time of a batched LU or Cholesky solve.
    """
    k = m.shape[0]

    def eliminate(i: int, a: jax.Array) -> jax.Array:
        row = a[i] / a[i, i]
        return (a - a[:, i, None] * row[None, :]).at[i].set(row)

    return jax.lax.fori_loop(0, k, eliminate, jnp.concatenate([m, rhs], axis=1))[:, k:]
