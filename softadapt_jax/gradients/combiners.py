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
``gramian(..., method="sequential")``, then one weighted VJP.

Common options:

* ``mask`` (optax-style): only masked-in leaves (shared parameters) enter the
  Gramian and get the combined update; masked-out leaves (task-specific
  parameters, which only one loss touches) get the plain sum over K.
* ``axis_name``: under ``jax.pmap``, the per-device per-component gradients are
  averaged with ``lax.pmean`` over this axis *before* combining. Combining is
  non-linear, so averaging afterwards would give a different (and
  replica-dependent) answer; averaging first gives every replica the update of
  the global batch.

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
from softadapt_jax.gradients.per_component import Mask, combine_leaves, split_stacked
from softadapt_jax.gradients.per_component import _gram_of_leaves as gram_of_leaves

CAGRAD_RESCALES = ("1+c^2", "1+c", "none")
MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class PCGradState(NamedTuple):
    """State of :func:`pcgrad`: the raw ``uint32[2]`` PRNG key drawing the projection orders."""

    key: jax.Array


def pcgrad(
    seed: int = 0,
    *,
    random_order: bool = True,
    mask: Mask = None,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """PCGrad, gradient surgery (Yu et al. 2020, arXiv:2001.06782).

    For every component i, ``g_i`` is projected in turn onto the normal plane
    of each ``g_j`` it conflicts with (``<g_i^PC, g_j> < 0``)::

        g_i^PC <- g_i^PC - <g_i^PC, g_j> / ||g_j||^2 * g_j

    visiting all j (i included, a no-op unless earlier projections turned
    ``g_i^PC`` against ``g_i``) in a random order drawn afresh for every i and
    every step, projecting against the *original* ``g_j``, as the authors'
    code does; the update is ``sum_i g_i^PC``. Since every projection only
    subtracts multiples of original gradients, the result is
    ``sum_k c_k g_k`` with ``c`` computed from the Gramian alone
    (:func:`pcgrad_weights`).

    Args:
      seed: seeds ``jax.random.PRNGKey(seed)``, kept in the state and split
        every step (so replicas under pmap draw the same orders).
      random_order: if False, every i visits j = 0..K-1 in order (deterministic).
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

    def init_fn(params: Any) -> PCGradState:
        del params
        return PCGradState(key=jax.random.PRNGKey(int(seed)))

    def weights_fn(gram: jax.Array, state: PCGradState, _: None) -> tuple[jax.Array, PCGradState]:
        k = gram.shape[0]
        if random_order:
            key, sub = jax.random.split(state.key)
            orders = random_orders(sub, k)
        else:
            key = state.key
            orders = jnp.tile(jnp.arange(k), (k, 1))
        return pcgrad_weights(gram, orders), PCGradState(key=key)

    return _gramian_transform(init_fn, weights_fn, mask, axis_name)


def mgda(
    *,
    normalization: str = "none",
    max_iters: int = 250,
    tol: float = 1e-6,
    mask: Mask = None,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """MGDA, multiple-gradient descent (Sener & Koltun 2018, arXiv:1810.04650).

    The update is the minimum-norm point of the convex hull of the
    gradients, ``d = sum_k w_k g_k`` with
    ``w = argmin_{w in simplex} ||sum_k w_k g_k||^2``; it has a non-negative
    inner product with every ``g_k`` (``<d, g_k> >= ||d||^2``), so no
    component's loss increases to first order. Weights from
    :func:`mgda_weights`: the exact closed form for K = 2, Frank-Wolfe for
    K >= 3. Note ``d`` is a convex combination (weights sum to 1), about K
    times smaller than the plain sum.

    Gradient normalisation (the authors' ``gradient_normalizers``): the
    weights are solved for the normalised gradients ``g_k / n_k`` and then
    applied to the raw ones, ``d = sum_k w_k g_k``, as their training script
    does (it back-propagates ``sum_k w_k L_k``). ``n_k`` is 1 (``"none"``),
    ``||g_k||`` (``"l2"``: every component counts alike, whatever its
    scale), ``L_k`` (``"loss"``) or ``L_k ||g_k||`` (``"loss+"``, the
    setting of the authors' published configurations). The loss-based
    forms need the current losses, ``update(..., losses=losses)``, and
    assume positive losses; norms and losses are floored at 1e-20 as in
    torchjd. Only the update's direction is scale-free under ``"l2"``:
    ``d`` itself still scales with the gradients.

    Args:
      normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"``.
      max_iters: iteration cap of the Frank-Wolfe solver (static, for jit).
      tol: stop early once the Frank-Wolfe duality gap of the scaled problem
        is below ``tol``.
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
    check_positive_int(max_iters, "max_iters")
    tol = _check_nonneg_float(tol, "tol")

    def weights_fn(gram: jax.Array, state: Any, losses: jax.Array | None) -> tuple[jax.Array, Any]:
        normalized = normalize_gramian(gram, normalization, losses)
        return mgda_weights(normalized, max_iters=max_iters, tol=tol), state

    needs_losses = normalization in ("loss", "loss+")
    return _gramian_transform(
        lambda _: optax.EmptyState(), weights_fn, mask, axis_name, needs_losses=needs_losses
    )


def cagrad(
    c: float = 0.5,
    *,
    rescale: str = "1+c^2",
    max_iters: int = 250,
    tol: float = 1e-6,
    mask: Mask = None,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """CAGrad, conflict-averse gradient descent (Liu et al. 2021, arXiv:2110.14048).

    With the average gradient ``g0 = (1/K) sum_k g_k`` and
    ``phi = c^2 ||g0||^2``, CAGrad solves the dual over the simplex::

        w = argmin_{w in simplex}  <g_w, g0> + sqrt(phi) ||g_w||,   g_w = sum_k w_k g_k

    and returns ``d = g0 + sqrt(phi) / ||g_w|| * g_w``, the update within the
    ball ``||d - g0|| <= c ||g0||`` that maximises the worst component's
    first-order improvement.

    Scaling: the authors' code (``cagrad(grads, alpha, rescale=1)``, used for
    all their experiments) divides ``d`` by ``1 + c^2``, which keeps the step
    size comparable to that of ``g0`` across values of ``c``; we follow it by
    default (``rescale="1+c^2"``). ``"1+c"`` (their ``rescale=2``) and
    ``"none"`` (``rescale=0``) are the alternatives. Note that ``g0`` is the
    *mean*, not the sum, and that with a single component the default gives
    ``(1 + c) / (1 + c^2) g``; ``rescale="1+c"`` gives ``g`` exactly.

    The dual is solved by accelerated projected gradient descent (FISTA)
    on the Gramian, whereas the authors call ``scipy.optimize.minimize``
    (SLSQP, not jittable); both are approximate solvers of the same convex
    problem.

    Args:
      c: the radius ``c >= 0`` of the ball around ``g0`` (``c = 0``: the mean).
      rescale: ``"1+c^2"`` (default, authors'), ``"1+c"`` or ``"none"``.
      max_iters: iteration cap of the dual solver (static, for jit).
      tol: stop once a projected-gradient step moves the weights by less than
        ``tol`` (L1).
      mask: optax-style mask of shared parameters.
      axis_name: pmap axis to average the gradients over before combining.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments ignored).
    """
    c = _check_nonneg_float(c, "c")
    check_choice(rescale, "rescale", CAGRAD_RESCALES)
    check_positive_int(max_iters, "max_iters")
    tol = _check_nonneg_float(tol, "tol")

    def weights_fn(gram: jax.Array, state: Any, _: None) -> tuple[jax.Array, Any]:
        return cagrad_weights(gram, c, rescale=rescale, max_iters=max_iters, tol=tol), state

    return _gramian_transform(lambda _: optax.EmptyState(), weights_fn, mask, axis_name)


def _gramian_transform(
    init_fn: Callable[[Any], Any],
    weights_fn: Callable[[jax.Array, Any, jax.Array | None], tuple[jax.Array, Any]],
    mask: Mask,
    axis_name: Hashable | None,
    *,
    needs_losses: bool = False,
) -> optax.GradientTransformationExtraArgs:
    # Shared by the three combiners: average over devices, split off task-specific leaves,
    # Gramian of the shared ones, coefficients, linear combination.
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
        weights, state = weights_fn(gram_of_leaves(shared), state, losses)
        return rebuild(combine_leaves(weights, shared)), state

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


# --- pure weight rules on the Gramian -----------------------------------------------------------------


def random_orders(key: jax.Array, num: int) -> jax.Array:
    """``[K, K]`` int array: row i is a random permutation of ``0..K-1`` (PCGrad's visiting order for i)."""
    keys = jax.random.split(key, num)
    return jax.vmap(lambda kk: jax.random.permutation(kk, num))(keys)


def pcgrad_weights(gram: jax.Array, orders: jax.Array) -> jax.Array:
    """PCGrad's coefficients: ``sum_i g_i^PC = sum_k c_k g_k``.

    ``g_i^PC`` is tracked as a coefficient vector ``a`` over the original
    gradients, so ``<g_i^PC, g_j> = (G a)_j`` needs only the Gramian.

    Args:
      gram: ``[K, K]`` Gramian.
      orders: ``[K, K]`` ints; row i lists the j's that ``g_i`` is projected
        against, in order.

    Returns:
      ``c``: ``[K]`` coefficients.
    """
    k = gram.shape[0]
    eye = jnp.eye(k, dtype=gram.dtype)

    def one(i: jax.Array, order: jax.Array) -> jax.Array:
        def step(a: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
            dot = a @ gram[:, j]
            gjj = gram[j, j]
            # Only conflicting pairs are projected; a zero gradient g_j is never divided by.
            coef = jnp.where((dot < 0) & (gjj > 0), dot / jnp.where(gjj > 0, gjj, 1.0), 0.0)
            return a - coef * eye[j], None

        a, _ = jax.lax.scan(step, eye[i], order)
        return a

    return jnp.sum(jax.vmap(one)(jnp.arange(k), orders), axis=0)


def min_norm_2(g11: jax.Array, g12: jax.Array, g22: jax.Array) -> jax.Array:
    """The exact two-point min-norm weight: ``argmin_{0<=t<=1} ||t u + (1 - t) v||^2``.

    With ``g11 = ||u||^2``, ``g12 = <u, v>``, ``g22 = ||v||^2``:
    ``t = clip((g22 - g12) / (g11 - 2 g12 + g22), 0, 1)``, and ``t = 1/2`` when
    ``u = v`` (every t is optimal; 1/2 keeps the rule symmetric).
    """
    den = g11 - 2.0 * g12 + g22
    t = jnp.where(den > 0, (g22 - g12) / jnp.where(den > 0, den, 1.0), 0.5)
    return jnp.clip(t, 0.0, 1.0)


def normalize_gramian(gram: jax.Array, normalization: str, losses: jax.Array | None = None) -> jax.Array:
    """The Gramian of the normalised gradients ``g_k / n_k``: ``G_ij / (n_i n_j)``.

    Args:
      gram: ``[K, K]`` Gramian.
      normalization: ``"none"``, ``"l2"`` (``n_k = ||g_k||``), ``"loss"``
        (``n_k = L_k``) or ``"loss+"`` (``n_k = L_k ||g_k||``); see :func:`mgda`.
      losses: ``[K]`` component losses, for the loss-based forms.

    Returns:
      The ``[K, K]`` normalised Gramian (``gram`` itself for ``"none"``).
    """
    check_choice(normalization, "normalization", MGDA_NORMALIZATIONS)
    if normalization == "none":
        return gram
    if normalization != "l2" and losses is None:
        raise ValueError(f"normalization={normalization!r} needs `losses`.")
    floor = jnp.asarray(1e-20, gram.dtype)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), floor))
    if normalization == "l2":
        n = norms
    else:
        n = jnp.maximum(jnp.asarray(losses, gram.dtype), floor)
        if normalization == "loss+":
            n = n * norms
    return gram / (n[:, None] * n[None, :])


def mgda_weights(gram: jax.Array, *, max_iters: int = 250, tol: float = 1e-6) -> jax.Array:
    """MGDA's weights: ``argmin_{w in simplex} w^T G w``.

    K = 1: ``[1]``. K = 2: the exact closed form (:func:`min_norm_2`).
    K >= 3: Frank-Wolfe as in Sener & Koltun's ``find_min_norm_element_FW``
    (start from the best pair, exact line search), with two additions that
    make it converge linearly and to float precision instead of O(1/t):

    * away steps (Lacoste-Julien & Jaggi 2015): when moving weight away from
      the worst vertex in the support gains more than moving towards the best
      vertex, do that; without them Frank-Wolfe zig-zags near a face;
    * a final exact solve on the active face (``w_S ∝ G_S^{-1} 1``), kept only
      if it is feasible and not worse.

    The Gramian is divided by its largest diagonal entry first, which leaves
    the minimiser unchanged and keeps ``tol`` scale-free.

    Args:
      gram: ``[K, K]`` Gramian (symmetric PSD).
      max_iters: iteration cap (static).
      tol: stop once the duality gap ``w^T G w - min_k (G w)_k`` is below it.

    Returns:
      ``[K]`` weights on the simplex (non-negative, summing to 1).
    """
    k = gram.shape[0]
    dtype = gram.dtype
    if k == 1:
        return jnp.ones((1,), dtype)
    scale = jnp.max(jnp.diag(gram))
    g = gram / jnp.where(scale > 0, scale, 1.0)
    if k == 2:
        t = min_norm_2(g[0, 0], g[0, 1], g[1, 1])
        w = jnp.stack([t, 1.0 - t])
    else:
        w = _mgda_frank_wolfe(g, max_iters, tol)
        w = _polish_on_face(g, w)
    # All-zero gradients: every w is optimal; uniform keeps the rule permutation-equivariant.
    return jnp.where(scale > 0, w, jnp.full((k,), 1.0 / k, dtype)).astype(dtype)


def _mgda_frank_wolfe(g: jax.Array, max_iters: int, tol: float) -> jax.Array:
    k = g.shape[0]
    eye = jnp.eye(k, dtype=g.dtype)
    # Start from the best pair, as Sener & Koltun do: for two tasks it already is the answer.
    i, j = (jnp.asarray(a) for a in np.triu_indices(k, 1))
    t = min_norm_2(g[i, i], g[i, j], g[j, j])
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


def project_simplex(v: jax.Array) -> jax.Array:
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
    rescale: str = "1+c^2",
    max_iters: int = 250,
    tol: float = 1e-6,
) -> jax.Array:
    """CAGrad's coefficients: ``d = sum_k coef_k g_k`` (see :func:`cagrad` for the formula).

    ``coef = (1/K + sqrt(phi) / ||g_w|| * w) / rescale`` with ``w`` the dual
    solution, found by FISTA with projections onto the simplex, step
    ``1 / (lambda_max(G) (1 + sqrt(phi) / ||g_w||))`` (the local curvature
    of the objective), keeping the best iterate.

    Args:
      gram: ``[K, K]`` Gramian.
      c: the ball radius (may be a traced scalar).
      rescale: ``"1+c^2"``, ``"1+c"`` or ``"none"``.
      max_iters: iteration cap (static).
      tol: stop once a step moves the weights by less than ``tol`` (L1).

    Returns:
      ``[K]`` coefficients (not on the simplex: they sum to
      ``(1 + sqrt(phi)/||g_w||) / rescale``).
    """
    check_choice(rescale, "rescale", CAGRAD_RESCALES)
    k = gram.shape[0]
    dtype = gram.dtype
    c = jnp.asarray(c, dtype)
    scale = jnp.max(jnp.diag(gram))
    g = gram / jnp.where(scale > 0, scale, 1.0)
    b = jnp.full((k,), 1.0 / k, dtype)
    # ||g0||^2 = b^T G b = mean(G); the authors' epsilons (1e-8) act here on the scaled Gramian.
    sqrt_phi = c * jnp.sqrt(jnp.maximum(jnp.mean(g), 0.0) + 1e-8)
    w = b if k == 1 else _cagrad_dual(g, b, sqrt_phi, max_iters, tol)
    gw_norm = jnp.sqrt(jnp.maximum(w @ g @ w, 0.0))
    coef = b + sqrt_phi / (gw_norm + 1e-8) * w
    if rescale == "1+c^2":
        coef = coef / (1.0 + c**2)
    elif rescale == "1+c":
        coef = coef / (1.0 + c)
    return coef.astype(dtype)


def _cagrad_dual(g: jax.Array, b: jax.Array, sqrt_phi: jax.Array, max_iters: int, tol: float) -> jax.Array:
    gb = g @ b
    eps = 1e-12

    def objective(w: jax.Array) -> jax.Array:
        return w @ gb + sqrt_phi * jnp.sqrt(w @ g @ w + eps)

    def gradient(w: jax.Array) -> jax.Array:
        return gb + sqrt_phi * (g @ w) / jnp.sqrt(w @ g @ w + eps)

    lmax = jnp.maximum(jnp.linalg.eigvalsh(g)[-1], 1e-12)

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        it, _, _, _, _, _, moved = carry
        return (it < max_iters) & (moved > tol)

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        it, w, y, t, best, best_f, _ = carry
        norm_y = jnp.sqrt(y @ g @ y + eps)
        step = 1.0 / (lmax * (1.0 + sqrt_phi / norm_y))
        w_new = project_simplex(y - step * gradient(y))
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        y_new = w_new + ((t - 1.0) / t_new) * (w_new - w)
        f = objective(w_new)
        better = f < best_f
        moved = jnp.sum(jnp.abs(w_new - y))
        return (
            it + 1,
            w_new,
            y_new,
            t_new,
            jnp.where(better, w_new, best),
            jnp.where(better, f, best_f),
            moved,
        )

    init = (jnp.asarray(0), b, b, jnp.asarray(1.0, g.dtype), b, objective(b), jnp.asarray(jnp.inf, g.dtype))
    return jax.lax.while_loop(cond, body, init)[4]
