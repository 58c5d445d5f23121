"""Per-component gradients, their Gramian, and the pytree helpers the gradient combiners share.

Gradient-level methods (PCGrad, MGDA, CAGrad, GradNorm) need the gradient of
every loss component separately. :func:`per_component_grads` computes them as
K vector-Jacobian products of the loss vector, one per one-hot cotangent,
batched with ``jax.vmap`` over the rows of the identity: one forward pass, K backward
passes run as one batched pass. Every leaf of the result has a leading axis of
size K (the layout ``jax.jacrev`` gives), which is the ``updates`` layout the
combiners in :mod:`softadapt_jax.gradients.combiners` expect.

Memory (P = number of differentiated parameters, A = activations kept by the
forward pass):

* :func:`per_component_grads`: the output alone is K x P; the batched
  backward pass also carries K cotangents through every layer, so the peak is
  about A + K x (largest layer cotangent) + K x P.
* :func:`gramian` with ``method="stacked"`` (default): the same peak as
  :func:`per_component_grads`, because it builds the stacked gradients and
  reduces them leaf by leaf (``G += g_leaf @ g_leaf.T``, never a flat K x P
  matrix); only the ``[K, K]`` result survives.
* :func:`gramian` with ``method="sequential"``: column j of ``G = J J^T`` is
  ``J (J^T e_j)``, one transposed-linear (VJP) pass and one linear (JVP) pass
  of the linearised function (``jax.linearize`` keeps the residuals once).
  ``lax.map`` runs the K columns one after another, so the peak is about A + 2P
  and never K x P, at the price of 2K sequential passes instead of one batched
  one. Combined with a Gramian-only weight rule (``mgda_weights``,
  ``cagrad_weights``, ``pcgrad_weights``) and one weighted VJP
  (:func:`softadapt_jax.value_and_weighted_grad`), this gives MGDA, CAGrad or
  PCGrad without ever holding K gradients (with ``scaled=True`` for
  gradients that may be large, see below).

Overflow: the Gramian squares the gradients, so in float32 it overflows once
a gradient's norm passes about 1.8e19. With ``scaled=True``, :func:`gramian`
and :func:`stacked_gramian` return ``(G_hat, e)``: the Gramian of the
gradients multiplied by ``2**-e``, ``G = 4**e G_hat``, where ``e = 0`` while
the largest gradient entry is in ``[2**-(maxexp/4 + 1), 2**(maxexp / 4))``
(``[2**-33, 2**32)`` in float32, ``[2**-257, 2**256)`` in float64) and
otherwise brings it just inside that range (:func:`gram_exponent`): down
from above, so that the Gramian cannot overflow, and up from below, so that
it does not underflow to 0 (in float32 gradient norms below about 1e-19).
A power of two changes no rounding, so for gradients in the range the result
is the plain Gramian bit for bit. The combiners always work on this form.

Masks follow optax: a pytree of Python bools with the structure of the
parameters (or a prefix of it), or a callable returning one. ``True`` marks a
shared parameter, whose per-component gradients are kept; ``False`` marks a
task-specific one, whose gradients are summed over the components (the
combiners give such leaves the plain sum anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softadapt_jax._checks import check_choice

Mask = Any  # a pytree of bools (or a prefix of one), or a callable returning one

GRAMIAN_METHODS = ("stacked", "sequential")


def per_component_grads(
    loss_components_fn: Callable[..., Any],
    argnums: int = 0,
    has_aux: bool = False,
    *,
    mask: Mask = None,
    vmap_vjps: bool = True,
) -> Callable[..., tuple[Any, Any]]:
    """The gradient of every loss component, stacked on a leading axis K.

    ``grads[k] = d L_k / d x`` for ``x = args[argnums]``, computed as
    ``jax.vmap(vjp_fn)(eye(K))``: one forward pass and one batched backward
    pass. Equal to ``jax.jacrev(loss_components_fn, argnums)`` up to rounding.

    Args:
      loss_components_fn: ``f(*args) -> losses [K]`` (or ``(losses, aux)``
        with ``has_aux``).
      argnums: which positional argument to differentiate (an int).
      has_aux: whether ``f`` returns ``(losses, aux)``.
      mask: optional optax-style mask over ``args[argnums]`` (module
        docstring). Masked-out leaves come back summed over the components
        with a leading axis of size 1 (``[1, ...]``), so every leaf keeps a
        leading component axis and a combiner given the same ``mask`` sums
        them to the plain sum. The mask saves memory downstream, not compute:
        the batched backward pass still runs through those leaves.
      vmap_vjps: batch the K VJPs with ``vmap`` (default). ``False`` runs them
        as a Python loop over the static K, each with a constant one-hot
        cotangent: same result and peak memory of the output. Use ``False``
        when the components have their own forward passes (PINN residual and
        boundary terms): XLA then drops each VJP's work on the other
        components, and batching the VJP of forward-mode derivatives is
        expensive. On the library's PINN problems the loop costs 1.5x a plain
        gradient against 3.4-5.4x batched; with one shared forward pass (task
        heads on a common trunk) ``vmap`` is the faster form, 1.7x against
        2.1x (``benchmarks/bench_statistics.py``).

    Returns:
      ``g(*args) -> (losses, grads)``, or ``((losses, aux), grads)`` with
      ``has_aux``; every leaf of ``grads`` has shape ``[K, *param.shape]``
      (``[1, *param.shape]`` where masked out).

    Raises:
      ValueError: ``argnums`` out of range, ``f`` not returning a vector
        ``[K]``, or a malformed ``mask``.

    Example:
      >>> import jax.numpy as jnp
      >>> from softadapt_jax.gradients import per_component_grads
      >>> f = lambda p: jnp.stack([jnp.sum(p ** 2), jnp.sum(p)])
      >>> losses, grads = per_component_grads(f)(jnp.ones(3))
      >>> grads.shape
      (2, 3)
    """
    _check_argnums(argnums)
    if not isinstance(vmap_vjps, bool):
        raise ValueError(f"`vmap_vjps` must be a bool, got {vmap_vjps!r}.")

    def wrapped(*args: Any) -> tuple[Any, Any]:
        x, f = _bind(loss_components_fn, args, argnums)
        out = jax.vjp(f, x, has_aux=has_aux)
        losses, vjp_fn = out[0], out[1]
        k = _check_losses(losses)
        # A NumPy eye is a compile-time constant: XLA then folds the zeros of each
        # one-hot cotangent and drops the backward work of the other components
        # (figures in benchmarks/RESULTS.md, gradient statistics).
        eye = np.eye(k, dtype=losses.dtype)
        if vmap_vjps:
            (grads,) = jax.vmap(vjp_fn)(eye)
        else:
            rows = [vjp_fn(eye[i])[0] for i in range(k)]
            grads = jax.tree.map(lambda *g: jnp.stack(g), *rows)
        if mask is not None:
            keep = resolve_mask(mask, x)
            grads = jax.tree.map(lambda g, m: g if m else jnp.sum(g, axis=0, keepdims=True), grads, keep)
        if has_aux:
            return (losses, out[2]), grads
        return losses, grads

    return wrapped


def gramian(
    loss_components_fn: Callable[..., Any],
    argnums: int = 0,
    has_aux: bool = False,
    *,
    mask: Mask = None,
    method: str = "stacked",
    scaled: bool = False,
) -> Callable[..., tuple[Any, Any]]:
    """The Gramian ``G_ij = <g_i, g_j>`` of the per-component gradients, without returning them.

    Args:
      loss_components_fn: ``f(*args) -> losses [K]`` (or ``(losses, aux)``).
      argnums: which positional argument to differentiate.
      has_aux: whether ``f`` returns ``(losses, aux)``.
      mask: optional optax-style mask; only masked-in (shared) leaves
        contribute to the inner products.
      method: ``"stacked"`` (one batched backward pass, K x P memory
        transiently) or ``"sequential"`` (2K sequential linear passes, no
        K x P buffer); see the module docstring for the memory of each.
      scaled: return ``(G_hat, e)`` with ``G = 4**e G_hat`` instead of ``G``
        (module docstring), so that gradients of any finite size give a finite
        ``G_hat``. The weight rules of :mod:`softadapt_jax.gradients.combiners`
        are invariant to a common scale of the gradients (up to their
        absolute guards, see each), so they can be given ``G_hat`` directly.
        With ``method="sequential"`` it costs K more VJPs (a first pass finds
        the largest gradient entry).

    Returns:
      ``g(*args) -> (losses, G)`` or ``((losses, aux), G)`` with ``has_aux``;
      ``G`` is ``[K, K]``, symmetric positive semi-definite, in at least
      float32; with ``scaled=True`` it is the pair ``(G_hat, e)``, ``e`` an
      int32 scalar.

    Raises:
      ValueError: bad ``method``, ``argnums``, ``mask`` or ``scaled``; ``f``
        not returning a vector ``[K]``; a mask selecting no leaf.
    """
    check_choice(method, "method", GRAMIAN_METHODS)
    _check_argnums(argnums)
    _check_scaled(scaled)
    if method == "stacked":
        pcg = per_component_grads(loss_components_fn, argnums, has_aux)

        def stacked(*args: Any) -> tuple[Any, Any]:
            values, grads = pcg(*args)
            return values, stacked_gramian(grads, mask=mask, params=args[argnums], scaled=scaled)

        return stacked

    def sequential(*args: Any) -> tuple[Any, Any]:
        x, f = _bind(loss_components_fn, args, argnums)
        keep = resolve_mask(mask, x) if mask is not None else jax.tree.map(lambda _: True, x)
        leaves, treedef = jax.tree.flatten(x)
        flags = treedef.flatten_up_to(keep)
        if not any(flags):
            raise ValueError("`mask` selects no parameter leaf: the Gramian would be empty.")
        shared = [leaf for leaf, m in zip(leaves, flags, strict=True) if m]

        def f_shared(shared_leaves: list[Any]) -> Any:
            it = iter(shared_leaves)
            merged = [next(it) if m else leaf for leaf, m in zip(leaves, flags, strict=True)]
            return f(jax.tree.unflatten(treedef, merged))

        out = jax.linearize(f_shared, shared, has_aux=has_aux)
        losses, f_jvp = out[0], out[1]
        k = _check_losses(losses)
        f_vjp = jax.linear_transpose(f_jvp, shared)
        dtype = _gram_dtype(losses.dtype)
        eye = jnp.eye(k, dtype=losses.dtype)
        if scaled:
            # A first pass for the largest entry of any g_j; only K scalars are kept.
            peak = jax.lax.map(lambda e: max_abs(f_vjp(e)[0], dtype), eye)
            exponent = gram_exponent(jnp.max(peak), dtype)
        else:
            exponent = jnp.zeros((), jnp.int32)
        # G_hat = (2^-e J)(2^-e J)^T: the cotangent and the tangent each carry one factor 2^-e
        # (both maps are linear), so neither g_j nor J g_j is formed at full scale.
        down = power_of_two(-exponent, losses.dtype)

        def column(e: jax.Array) -> jax.Array:
            (v,) = f_vjp(e * down)
            return f_jvp(jax.tree.map(lambda x: x * down.astype(x.dtype), v))

        g = jax.lax.map(column, eye).astype(dtype)
        g = 0.5 * (g + g.T)  # exact symmetry; the two passes round differently
        result = (g, exponent) if scaled else g
        if has_aux:
            return (losses, out[2]), result
        return losses, result

    return sequential


def stacked_gramian(grads: Any, *, mask: Mask = None, params: Any = None, scaled: bool = False) -> Any:
    """``G_ij = <g_i, g_j>`` of stacked per-component gradients, leaf by leaf.

    Args:
      grads: a pytree whose leaves are ``[K, ...]``.
      mask: optional optax-style mask; only masked-in leaves are used. A
        callable mask is called on ``params`` if given, else on ``grads``.
      params: optional, only to evaluate a callable mask.
      scaled: return ``(G_hat, e)``, the Gramian of ``2**-e g`` and the
        int32 exponent ``e`` (:func:`gram_exponent`; negative for tiny gradients), instead of
        ``G = 4**e G_hat``.

    Returns:
      The ``[K, K]`` Gramian, in at least float32, or ``(G_hat, e)``. Without
      ``scaled`` it is ``inf`` where ``G`` exceeds the dtype's range (in
      float32, gradient norms above about 1.8e19). ``G_hat`` is finite for
      finite gradients; its entries are at most ``P 4**(maxexp/4)`` (P the
      number of shared entries per component). Components more than about
      ``2**(maxexp/2)`` times smaller than the largest entry (``2**64`` in
      float32) underflow in ``G_hat`` and are seen as zero gradients.

    Raises:
      ValueError: leaves disagree on K, the mask selects no leaf, or
        ``scaled`` is not a bool.
    """
    _check_scaled(scaled)
    shared, _, _ = split_stacked(grads, mask=mask, params=params)
    gram, exponent = scaled_gram_of_leaves(shared, scaled=scaled)
    return (gram, exponent) if scaled else gram


def resolve_mask(mask: Mask, tree: Any) -> Any:
    """Expands an optax-style mask to a pytree of Python bools with the structure of ``tree``.

    Raises:
      ValueError: the mask is not a prefix of ``tree``'s structure or holds
        anything but bools.
    """
    m = mask(tree) if callable(mask) else mask
    try:
        full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub), m, tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"`mask` must be a pytree of bools with the structure of the parameters (or a prefix of it), "
            f"or a callable returning one; got {m!r}: {err}"
        ) from None
    for flag in jax.tree.leaves(full):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(
                f"`mask` leaves must be Python bools (static, as in optax.masked); got {flag!r} "
                f"of type {type(flag).__name__}."
            )
    return jax.tree.map(bool, full)


def split_stacked(
    updates: Any, *, mask: Mask = None, params: Any = None
) -> tuple[list[jax.Array], Callable[[list[jax.Array]], Any], int]:
    """Splits stacked updates into masked-in leaves and a function that rebuilds the tree.

    Masked-out leaves are summed over their leading axis once, here.

    Args:
      updates: a pytree whose leaves are ``[K, ...]`` (masked-out leaves may
        have any leading size, e.g. 1 from :func:`per_component_grads`).
      mask: optional optax-style mask (``None``: every leaf is shared).
      params: optional parameters; when given, masked-in leaves must be
        ``[K, *param.shape]``, and a callable mask is called on them.

    Returns:
      ``(shared, rebuild, K)``: the masked-in ``[K, ...]`` leaves, a function
      taking the combined masked-in leaves (without the K axis) and returning
      the full update tree, and K.

    Raises:
      ValueError: a leaf without a leading axis, leaves disagreeing on K, a
        masked-in leaf not matching its parameter, or a mask selecting nothing.
    """
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:
        raise ValueError("`updates` has no leaves to combine.")
    if mask is None:
        flags = [True] * len(leaves)
    else:
        ref = updates if params is None else params
        flags = treedef.flatten_up_to(resolve_mask(mask, ref))
    if not any(flags):
        raise ValueError("`mask` selects no leaf: there is nothing to combine (use the plain sum instead).")
    param_leaves = [None] * len(leaves) if params is None else treedef.flatten_up_to(params)
    sizes = set()
    for g, m, p in zip(leaves, flags, param_leaves, strict=True):
        if jnp.ndim(g) == 0:
            raise ValueError(
                "gradient combiners expect per-component gradients stacked on a leading axis K; "
                "got a scalar leaf."
            )
        if m:
            sizes.add(g.shape[0])
            if p is not None and tuple(g.shape[1:]) != tuple(jnp.shape(p)):
                raise ValueError(
                    f"a stacked gradient leaf of shape {tuple(g.shape)} does not match its parameter of "
                    f"shape {tuple(jnp.shape(p))}: expected [K, *param.shape]."
                )
    if len(sizes) != 1:
        raise ValueError(
            "per-component gradient leaves disagree on the number of components K: "
            f"leading axes {sorted(sizes)}."
        )
    (k,) = sizes
    shared = [g for g, m in zip(leaves, flags, strict=True) if m]
    summed = {i: jnp.sum(g, axis=0) for i, (g, m) in enumerate(zip(leaves, flags, strict=True)) if not m}

    def rebuild(combined: list[jax.Array]) -> Any:
        it = iter(combined)
        out = [next(it) if m else summed[i] for i, m in enumerate(flags)]
        return jax.tree.unflatten(treedef, out)

    return shared, rebuild, k


def combine_leaves(
    weights: jax.Array, leaves: list[jax.Array], *, exponent: Any = None, rescale: bool = True
) -> list[jax.Array]:
    """``sum_k w_k g_k`` for each ``[K, ...]`` leaf, in the leaf's dtype.

    With ``exponent`` (``e``, from :func:`scaled_gram_of_leaves`), the sum is
    formed of the scaled gradients ``2**-e g_k``, so that no term overflows
    where the result is representable, and multiplied back by ``2**e`` if
    ``rescale``: ``rescale=False`` is for weights that already carry the
    factor ``2**e`` (MGDA's ``w_k / ||2**-e g_k||``). ``e = 0`` gives the plain
    sum bit for bit.
    """
    if exponent is None:
        return [jnp.tensordot(weights.astype(g.dtype), g, axes=1) for g in leaves]
    out = []
    for g in leaves:
        down = power_of_two(-exponent, g.dtype)
        d = jnp.tensordot(weights.astype(g.dtype), g * down, axes=1)
        out.append(d * power_of_two(exponent, g.dtype) if rescale else d)
    return out


def overflow_exponent(peak: jax.Array, dtype: Any) -> jax.Array:
    """The int32 exponent ``e >= 0`` by which gradients whose largest ``|entry|`` is ``peak`` are scaled down.

    ``e = 0`` while ``peak < 2**(maxexp // 4)`` of ``dtype`` (``2**32`` for
    float32), so that ordinary gradients are left as they are; above, ``e``
    brings the largest entry into ``[2**(maxexp//4 - 1), 2**(maxexp//4))``.
    Their Gramian is then at most ``P 2**(maxexp // 2)``, which leaves room for
    the weight rules' sums of K^2 terms. Works elementwise (a ``[K]`` peak gives
    ``[K]`` exponents); a non-finite peak gives 0, so non-finite gradients stay
    visible.
    """
    peak = jnp.asarray(peak, dtype)
    _, e = jnp.frexp(peak)  # peak = m 2^e, 0.5 <= m < 1
    bound = int(jnp.finfo(dtype).maxexp) // 4
    return jnp.where(jnp.isfinite(peak), jnp.maximum(e - bound, 0), 0).astype(jnp.int32)


def gram_exponent(peak: jax.Array, dtype: Any) -> jax.Array:
    """The int32 exponent ``e`` of the scaled Gramian: gradients are multiplied by ``2**-e``.

    :func:`overflow_exponent` for large gradients, and ``e < 0`` for small ones: below
    ``2**-(maxexp // 4 + 1)`` (``2**-33`` in float32) the largest entry is brought up into
    ``[2**-(maxexp//4 + 1), 2**-(maxexp//4))``, where its square is still a normal float, so the
    weight rules see a Gramian that has not underflowed (in float32 an unscaled one is 0 once the
    gradient norms fall below about 1e-19). ``e = 0`` in between, so ordinary gradients are left
    as they are. Elementwise; a zero or non-finite peak gives 0.
    """
    peak = jnp.asarray(peak, dtype)
    _, e = jnp.frexp(peak)
    bound = int(jnp.finfo(dtype).maxexp) // 4
    small = jnp.isfinite(peak) & (peak > 0)
    return jnp.where(small, jnp.minimum(e + bound, 0), 0).astype(jnp.int32) + overflow_exponent(peak, dtype)


def power_of_two(exponent: jax.Array, dtype: Any) -> jax.Array:
    """``2**exponent`` in ``dtype``, exact (the exponents used here stay in the normal range)."""
    return jnp.ldexp(jnp.ones(jnp.shape(exponent), dtype), exponent)


def scaled_gram_of_leaves(leaves: list[jax.Array], *, scaled: bool = True) -> tuple[jax.Array, jax.Array]:
    """``(G_hat, e)``: the Gramian of ``2**-e g`` over ``[K, ...]`` leaves, ``e`` from their largest entry.

    ``scaled=False`` fixes ``e = 0``: the plain Gramian.
    """
    k = leaves[0].shape[0]
    dtype = _gram_dtype(jnp.result_type(*leaves))
    if scaled:
        exponent = gram_exponent(max_abs(leaves, dtype), dtype)
    else:
        exponent = jnp.zeros((), jnp.int32)
    down = power_of_two(-exponent, dtype)
    g = jnp.zeros((k, k), dtype)
    for leaf in leaves:
        flat = leaf.reshape(k, -1).astype(dtype) * down
        # HIGHEST: on TPU the default matmul precision (bf16 passes) would spoil the solvers.
        g = g + jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
    return _row_major(g), exponent


# --- pure helpers -------------------------------------------------------------------------------------


def _row_major(gram: jax.Array) -> jax.Array:
    """``gram [K, K]`` unchanged, its producing products kept in row-major layout.

    The solvers hand the Gramian to LAPACK (svd, eigh), which wants its operand
    column-major, and XLA's layout assignment would push that layout back onto
    the products that make the Gramian, where the CPU backend then loses its
    fast matrix kernel for K = 2 or 3 (the products take several times longer).
    A barrier on the flat matrix fixes the products' layout; the reshapes are free.
    """
    k = gram.shape[0]
    return jax.lax.optimization_barrier(gram.reshape(k * k)).reshape(k, k)


def _gram_dtype(dtype: Any) -> Any:
    # Inner products of half-precision gradients lose every digit the solvers need.
    return jnp.promote_types(dtype, jnp.float32)


def max_abs(tree: Any, dtype: Any) -> jax.Array:
    """The largest ``|entry|`` over the leaves of ``tree``, in ``dtype`` (0 if every leaf is empty)."""
    peaks = [jnp.max(jnp.abs(x)).astype(dtype) for x in jax.tree.leaves(tree) if jnp.size(x)]
    return jnp.max(jnp.stack(peaks)) if peaks else jnp.zeros((), dtype)


def _check_scaled(scaled: Any) -> None:
    if not isinstance(scaled, bool):
        raise ValueError(f"`scaled` must be a bool, got {scaled!r}.")


def _check_argnums(argnums: Any) -> None:
    if isinstance(argnums, bool) or not isinstance(argnums, (int, np.integer)) or argnums < 0:
        raise ValueError(f"`argnums` must be a non-negative int, got {argnums!r}.")


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], argnums: int) -> tuple[Any, Callable[[Any], Any]]:
    if argnums >= len(args):
        raise ValueError(f"`argnums`={argnums} but only {len(args)} positional argument(s) given.")

    def f(x: Any) -> Any:
        return fn(*args[:argnums], x, *args[argnums + 1 :])

    return args[argnums], f


def _check_losses(losses: Any) -> int:
    if jnp.ndim(losses) != 1 or jnp.shape(losses)[0] < 1:
        raise ValueError(
            f"loss_components_fn must return a loss vector of shape [K] with K >= 1; "
            f"got shape {tuple(jnp.shape(losses))}."
        )
    return int(jnp.shape(losses)[0])
