"""RotoGrad (Javaloy & Valera, ICLR 2022, arXiv:2103.02631) for Flax Linen.

A hard-parameter-sharing model: a backbone ``z = f(x)`` shared by K heads.
RotoGrad gives every task k its own rotation ``R_k`` of the shared
representation, ``r_k = R_k z`` and ``y_k = h_k(r_k)``, and changes what flows
back into the backbone:

* **direction** (all variants): the rotations are trained, with their own
  (smaller) learning rate, to align each task's gradient on ``z`` with the
  common direction. With ``G_k = dL_k/dz`` (one row ``g_{n,k}`` per sample),
  ``U_k = G_k / ||G_k||`` (Frobenius norm over the batch), the common
  direction ``v_n = (1/K) sum_k u_{n,k}`` and ``gt_{n,k} = dL_k/dr_k``, the
  paper's Algorithm 1 minimises for every k::

      L_rot_k = - sum_n < R_k^T gt_{n,k}, v_n >

  i.e. maximises the (norm-weighted) cosine similarity between the task's
  gradient on ``z`` and the common direction. We divide ``L_rot_k`` by
  ``||G_k||`` (a constant: rotations preserve norms), which leaves its
  gradient direction unchanged and makes it a scale-free number in [-1, 1]
  (``metrics["alignment"]`` reports ``-L_rot_k``). The authors' library
  minimises ``mean_n ||R_k m_n - gt_{n,k}||^2`` with ``m`` the mean of the
  norm-equalised gradients; on the manifold of rotations its gradient is the
  same up to a positive factor per task (the ``||R m||^2`` term is constant).
  The heads see ``R_k`` as a constant (stop-gradient): rotations learn from
  ``L_rot`` only, as in the authors' code.
* **magnitude** (variant): what the backbone receives through ``z``:

  - ``RotateOnly``: ``sum_k G_k`` (the plain sum);
  - ``RotoGrad``: ``C sum_k U_k`` with ``C = sum_k a_k ||G_k||`` and
    ``a_k ∝ ||G_k|| / ||G_k^0||`` (the least-converged task sets the step);
  - ``RotoGradNorm``: ``sum_k w_k G_k`` with GradNorm-style weights
    ``w = K softmax(omega)`` trained on
    ``sum_k | w_k ||G_k|| - ||(1/K) sum_j w_j G_j|| (Lhat_k / mean Lhat)^alpha |``
    (the authors' formulation: the target uses the norm of the weighted mean
    gradient, not GradNorm's mean of norms).

Loss normalisation and burn-in follow the authors' code: ``L_k(t0)`` is
recorded at the first step and again at step ``burn_in_period`` (the losses of
the first steps change too fast to be a good reference); ``Lhat_k = L_k /
L_k(t0)`` drives RotoGradNorm, and with ``normalize_losses=True`` the
normalised losses are also what is back-propagated (heads and backbone).
``||G_k^0||`` is recorded at the same two steps.

Functional layout: the module holds the backbone, heads and the parameters
``params["rotograd"]`` (``rotations``: unconstrained ``[K, m, m]`` matrices W,
``R = expm(W - W^T)`` or the Cayley transform of ``W - W^T``, so ``R`` stays
orthogonal to float precision whatever the optimizer does; and ``weight_logits`` for
RotoGradNorm). The statistics (step, ``L(t0)``, ``||G^0||``) live in
:class:`RotoGradStats` in the train state, and :func:`rotograd_gradients`
builds the whole gradient tree in one pure function: one backbone forward and
VJP, one heads forward with K batched VJPs. Use :func:`rotograd_optimizer` to
give the RotoGrad parameters their own optimizer (``optax.multi_transform``).

On several devices, either use ``jax.jit`` with a ``NamedSharding`` on the
batch (the sharded recipe of :mod:`softadapt_jax.training`): the
batch-wide norms and means are then global reductions, inserted by XLA; or
``jax.pmap`` with an ``axis_name`` (:func:`make_rotograd_pmap_train_step`, or
``axis_name=`` of :func:`make_rotograd_train_step` / :func:`rotograd_gradients`
inside your own ``pmap``), with the state replicated and the batch split on
axis 0 (:func:`softadapt_jax.training.replicate` and
:func:`~softadapt_jax.training.shard_batch`). Every batch-wide quantity is then
reduced over the D devices explicitly: the losses are ``pmean``-ed, ``G_k``
becomes the local rows of the gradient of the global mean loss (the local
``dL_k/dz`` divided by D), ``||G_k||`` and the norm of RotoGradNorm's weighted
mean gradient are square roots of ``psum``-ed sums of squares, and the network
and rotation gradients are ``psum``-ed. This equals one device on the whole
batch (to float rounding), and every replica holds the same state, provided
every device has the same number of samples and ``loss_fn`` returns means over
its local batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import FrozenDict
from flax.training import train_state

from softadapt_jax.guard import all_finite, keep_if

VARIANTS = ("rotate_only", "rotograd", "rotogradnorm")
PARAMETRIZATIONS = ("expm", "cayley")
ROTOGRAD_KEY = "rotograd"

LossFn = Callable[[Sequence[Any], Any], jax.Array]
Metrics = dict[str, jax.Array]


class RotoGradStats(NamedTuple):
    """The non-trainable RotoGrad state (kept in :class:`RotoGradTrainState`)."""

    step: jax.Array  # int32, training steps so far (skipped ones excluded)
    initial_losses: jax.Array  # [K], L_k(t0)
    initial_grad_norms: jax.Array  # [K], ||G_k(t0)||
    skipped: jax.Array  # int32, steps skipped for non-finite losses, gradients or statistics


class RotoGrad(nn.Module):
    """RotoGrad: per-task rotations of the shared representation plus magnitude equalisation.

    Mirrors the authors' ``RotoGrad(backbone, heads, latent_size,
    burn_in_period=20, normalize_losses=False)``; see the module docstring for
    the algorithm. Calling the module returns the K predictions
    ``[h_k(R_k z) for k]`` (inference); train with
    :func:`make_rotograd_train_step`.

    Attributes:
      backbone: the shared module, ``x -> z`` with ``z.shape[-1] == latent_size``.
      heads: K task-specific modules, ``r_k -> y_k``.
      latent_size: size d of the last axis of ``z``.
      burn_in_period: step at which ``L(t0)`` and ``||G^0||`` are re-recorded.
      normalize_losses: back-propagate ``L_k / L_k(t0)`` instead of ``L_k``.
      rotation_size: rotate only the first m <= d coordinates of ``z``
        (default d); the rest passes through unchanged.
      parametrization: ``"expm"`` (matrix exponential, as the authors' default;
        reaches every rotation) or ``"cayley"`` (cheaper; cannot reach
        rotations with eigenvalue -1).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
      >>> from softadapt_jax.flax.rotograd import RotoGrad, rotograd_optimizer, create_rotograd_train_state
      >>> model = RotoGrad(nn.Dense(4), [nn.Dense(1), nn.Dense(1)], latent_size=4)
      >>> params = model.init(jax.random.PRNGKey(0), jnp.ones((8, 3)))["params"]
      >>> tx = rotograd_optimizer(optax.adam(1e-3), optax.adam(1e-4))
      >>> state = create_rotograd_train_state(model, params, tx)
    """

    backbone: nn.Module
    heads: Sequence[nn.Module]
    latent_size: int
    burn_in_period: int = 20
    normalize_losses: bool = False
    rotation_size: int | None = None
    parametrization: str = "expm"

    variant: ClassVar[str] = "rotograd"

    def __post_init__(self) -> None:
        _validate(self)
        super().__post_init__()

    @property
    def num_tasks(self) -> int:
        """K, the number of heads."""
        return len(self.heads)

    @property
    def rotated_size(self) -> int:
        """m, the number of leading coordinates of ``z`` that are rotated."""
        return self.latent_size if self.rotation_size is None else int(self.rotation_size)

    def setup(self) -> None:
        k, m, with_weights = self.num_tasks, self.rotated_size, self.variant == "rotogradnorm"

        def init(rng: jax.Array) -> dict[str, jax.Array]:
            del rng
            # W = 0 gives R = I: training starts from the plain multi-task model, as the authors'.
            p = {"rotations": jnp.zeros((k, m, m), jnp.float32)}
            if with_weights:
                p["weight_logits"] = jnp.zeros((k,), jnp.float32)
            return p

        self.rotograd = self.param(ROTOGRAD_KEY, init)

    def encode(self, x: Any) -> jax.Array:
        """The shared representation ``z = backbone(x)``."""
        z = self.backbone(x)
        if jnp.ndim(z) < 1 or jnp.shape(z)[-1] != self.latent_size:
            raise ValueError(
                f"the backbone output must have last axis latent_size={self.latent_size}; "
                f"got shape {tuple(jnp.shape(z))}."
            )
        return z

    def rotation_matrices(self) -> jax.Array:
        """The K rotations ``[K, m, m]``."""
        return rotation_matrices(self.rotograd["rotations"], self.parametrization)

    def task_weights(self) -> jax.Array:
        """RotoGradNorm's weights ``[K]`` (sum K); ones for the other variants."""
        if self.variant != "rotogradnorm":
            return jnp.ones((self.num_tasks,), jnp.float32)
        return norm_weights(self.rotograd["weight_logits"])

    def decode(self, z: jax.Array, rotations: jax.Array) -> list[Any]:
        """The K predictions ``h_k(R_k z)`` for given rotations ``[K, m, m]``."""
        return [head(rotate(z, rotations[k])) for k, head in enumerate(self.heads)]

    def task_prediction(self, x: Any, index: int) -> Any:
        """The end-to-end model of one task, ``h_index(R_index backbone(x))`` (the authors' ``model[i]``)."""
        if not 0 <= index < self.num_tasks:
            raise ValueError(f"`index` must be in [0, {self.num_tasks}), got {index}.")
        return self.heads[index](rotate(self.encode(x), self.rotation_matrices()[index]))

    def __call__(self, x: Any) -> list[Any]:
        return self.decode(self.encode(x), self.rotation_matrices())


class RotateOnly(RotoGrad):
    """RotoGrad's rotations only: the backbone receives the plain sum of the task gradients."""

    variant: ClassVar[str] = "rotate_only"


class RotoGradNorm(RotoGrad):
    """RotoGrad's rotations with GradNorm-style learned task weights (``alpha`` required, > = 0)."""

    alpha: float | None = None

    variant: ClassVar[str] = "rotogradnorm"


class RotoGradTrainState(train_state.TrainState):
    """A Flax ``TrainState`` that also carries :class:`RotoGradStats`."""

    stats: RotoGradStats


def init_rotograd_stats(num_tasks: int) -> RotoGradStats:
    """Fresh statistics (recorded at the first step)."""
    return RotoGradStats(
        step=jnp.zeros((), jnp.int32),
        initial_losses=jnp.ones((num_tasks,), jnp.float32),
        initial_grad_norms=jnp.ones((num_tasks,), jnp.float32),
        skipped=jnp.zeros((), jnp.int32),
    )


def rotograd_optimizer(
    model_tx: optax.GradientTransformation, rotograd_tx: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    """``optax.multi_transform``: ``rotograd_tx`` for ``params["rotograd"]``, ``model_tx`` for the rest.

    The paper analyses RotoGrad as a Stackelberg game in which the rotations
    (leader) learn more slowly than the network (follower); the authors advise
    a smaller learning rate for them.
    """

    def labels(params: Any) -> Any:
        out = {
            key: jax.tree.map(lambda _, key=key: "rotograd" if key == ROTOGRAD_KEY else "model", sub)
            for key, sub in params.items()
        }
        return FrozenDict(out) if isinstance(params, FrozenDict) else out

    return optax.multi_transform({"model": model_tx, "rotograd": rotograd_tx}, labels)


def create_rotograd_train_state(
    model: RotoGrad, params: Any, tx: optax.GradientTransformation
) -> RotoGradTrainState:
    """A :class:`RotoGradTrainState` for ``model`` with fresh statistics."""
    if ROTOGRAD_KEY not in params:
        raise ValueError(
            f"`params` must be the variables['params'] of a RotoGrad module (no {ROTOGRAD_KEY!r} key)."
        )
    return RotoGradTrainState.create(
        apply_fn=model.apply, params=params, tx=tx, stats=init_rotograd_stats(model.num_tasks)
    )


def make_rotograd_train_step(
    model: RotoGrad, loss_fn: LossFn, *, axis_name: str | None = None
) -> Callable[[RotoGradTrainState, Any, Any], tuple[RotoGradTrainState, Metrics]]:
    """Builds ``step(state, x, targets) -> (state, metrics)`` (wrap it in ``jax.jit`` or ``jax.pmap``).

    Args:
      model: a :class:`RotoGrad`, :class:`RotateOnly` or :class:`RotoGradNorm`.
      loss_fn: ``loss_fn(predictions, targets) -> losses [K]``, with
        ``predictions`` the list of K head outputs; each loss a mean over the
        batch (``G_k`` then has one row per sample).
      axis_name: the ``pmap`` axis the batch is split over, or ``None`` (one
        device, or ``jit`` with sharded inputs); see :func:`rotograd_gradients`.

    Returns:
      A pure step function; ``metrics`` as in :func:`rotograd_gradients`, plus
      ``skipped`` (bool). A step whose losses, gradients or statistics are not
      finite changes nothing (parameters, optimizer state, statistics: a nan
      batch at the burn-in step would otherwise leave ``L(t0)`` nan for good)
      and is counted in ``state.stats.skipped``.
    """

    def step(state: RotoGradTrainState, x: Any, targets: Any) -> tuple[RotoGradTrainState, Metrics]:
        grads, stats, metrics = rotograd_gradients(
            model, state.params, state.stats, x, targets, loss_fn, axis_name=axis_name
        )
        ok = all_finite(metrics["losses"], grads, stats)
        skipped = state.replace(stats=state.stats._replace(skipped=state.stats.skipped + 1))
        new_state = keep_if(ok, state.apply_gradients(grads=grads, stats=stats), skipped)
        return new_state, {**metrics, "skipped": jnp.logical_not(ok)}

    return step


def make_rotograd_pmap_train_step(
    model: RotoGrad, loss_fn: LossFn, *, axis_name: str = "devices"
) -> Callable[[RotoGradTrainState, Any, Any], tuple[RotoGradTrainState, Metrics]]:
    """The RotoGrad train step under ``jax.pmap``: replicated state, batch split on axis 0.

    Every device must hold the same number of samples, and ``loss_fn`` must
    return means over the local batch: the global quantities are then exact
    reductions over devices (see :func:`rotograd_gradients`), and every replica
    holds the same state.

    Args:
      model, loss_fn: as in :func:`make_rotograd_train_step`.
      axis_name: name of the mapped axis.

    Returns:
      ``pstep(replicated_state, x, targets) -> (replicated_state, metrics)``,
      with ``x`` and ``targets`` of shape ``[local_devices, per_device, ...]``
      (see :func:`softadapt_jax.training.replicate` and
      :func:`softadapt_jax.training.shard_batch`); ``metrics`` are the same on
      every replica.
    """
    return jax.pmap(make_rotograd_train_step(model, loss_fn, axis_name=axis_name), axis_name=axis_name)


def _validate(m: RotoGrad) -> None:
    def positive_int(value: Any, name: str, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")

    positive_int(m.latent_size, "latent_size", 1)
    positive_int(m.burn_in_period, "burn_in_period", 0)
    if m.rotation_size is not None:
        positive_int(m.rotation_size, "rotation_size", 1)
        if m.rotation_size > m.latent_size:
            raise ValueError(
                f"`rotation_size` must be <= latent_size={m.latent_size}, got {m.rotation_size}."
            )
    if not isinstance(m.heads, Sequence) or len(m.heads) == 0:
        raise ValueError(f"`heads` must be a non-empty sequence of modules, got {m.heads!r}.")
    if not isinstance(m.normalize_losses, bool):
        raise ValueError(f"`normalize_losses` must be a bool, got {m.normalize_losses!r}.")
    if m.parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            f"`parametrization` must be one of {list(PARAMETRIZATIONS)}, got {m.parametrization!r}."
        )
    if m.variant == "rotogradnorm":
        alpha = getattr(m, "alpha", None)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
            raise ValueError(
                f"RotoGradNorm needs `alpha`, a float >= 0 (GradNorm's asymmetry); got {alpha!r}."
            )
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"`alpha` must be a finite float >= 0, got {alpha!r}.")


# --- pure functions -----------------------------------------------------------------------------------


def skew(w: jax.Array) -> jax.Array:
    """``W - W^T`` over the last two axes: an element of the Lie algebra so(m)."""
    return w - jnp.swapaxes(w, -1, -2)


def rotation_matrices(w: jax.Array, parametrization: str = "expm") -> jax.Array:
    """Rotations ``[..., m, m]`` from unconstrained ``[..., m, m]`` matrices.

    ``"expm"``: ``expm(A)`` with ``A = W - W^T`` (onto SO(m), see :func:`expm`);
    ``"cayley"``: ``(I - A)^{-1} (I + A)`` (orthogonal for any skew A).
    Either is followed by one Newton-Schulz step ``R (3I - R^T R) / 2``, which
    maps a nearly orthogonal R to an orthogonal one up to second order: it
    removes the rounding drift of the squarings, so ``R^T R = I`` holds to
    float precision (about 1e-7 in float32) even for large ``||A||``, where
    ``expm`` alone drifts to 1e-5..1e-4.
    """
    a = skew(w)
    if parametrization == "expm":
        r = expm(a)
    elif parametrization == "cayley":
        eye = jnp.eye(a.shape[-1], dtype=a.dtype)
        r = jnp.linalg.solve(eye - a, eye + a)
    else:
        raise ValueError(
            f"`parametrization` must be one of {list(PARAMETRIZATIONS)}, got {parametrization!r}."
        )
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    return r @ (1.5 * eye - 0.5 * jnp.swapaxes(r, -1, -2) @ r)


def expm(a: jax.Array, *, degree: int = 16, theta: float = 1.0, max_squarings: int = 24) -> jax.Array:
    """Matrix exponential of ``[..., m, m]`` by scaling and squaring a Taylor polynomial.

    ``expm(A) = expm(A / 2^s)^(2^s)`` with s chosen so that ``||A / 2^s||_1 <=
    theta``; the degree-16 Taylor remainder is then below 1e-14. The squarings
    run as a ``fori_loop`` of static length (masked beyond s), so the function
    is reverse-differentiable and jit/vmap-safe. We use it rather than
    ``jax.scipy.linalg.expm`` (Pade 13 with branches on the norm) because it
    compiles about three times faster with its gradient, and the rotations
    here are small matrices where its few extra matmuls cost nothing.
    """
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    norm = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)
    s = jax.lax.stop_gradient(
        jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm, 1e-30) / theta)), 0, max_squarings)
    )
    x = a * jnp.exp2(-s)[..., None, None]
    r = eye
    for k in range(degree, 0, -1):  # Horner: I + x (I + x/2 (I + x/3 (...)))
        r = eye + (x @ r) / k

    def square(i: int, r: jax.Array) -> jax.Array:
        return jnp.where((i < s)[..., None, None], r @ r, r)

    return jax.lax.fori_loop(0, max_squarings, square, r)


def rotate(z: jax.Array, rotation: jax.Array) -> jax.Array:
    """``R z`` on the first m coordinates of the last axis of ``z`` (rows are samples)."""
    m = rotation.shape[-1]
    head = jnp.einsum("ij,...j->...i", rotation.astype(z.dtype), z[..., :m])
    return head if m == z.shape[-1] else jnp.concatenate([head, z[..., m:]], axis=-1)


def rotate_back(z: jax.Array, rotation: jax.Array) -> jax.Array:
    """``R^T z`` on the first m coordinates (the inverse of :func:`rotate`)."""
    return rotate(z, jnp.swapaxes(rotation, -1, -2))


def norm_weights(logits: jax.Array) -> jax.Array:
    """RotoGradNorm's weights: ``K softmax(logits)``, positive and summing to K."""
    return logits.shape[0] * jax.nn.softmax(logits)


def rotograd_gradients(
    model: RotoGrad,
    params: Any,
    stats: RotoGradStats,
    x: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    axis_name: str | None = None,
) -> tuple[Any, RotoGradStats, Metrics]:
    """The full RotoGrad gradient tree for one batch (see the module docstring).

    Args:
      model: a RotoGrad-family module.
      params: its ``variables["params"]``.
      stats: the current :class:`RotoGradStats`.
      x: the backbone input.
      targets: anything ``loss_fn`` needs besides the predictions.
      loss_fn: ``(predictions, targets) -> losses [K]``, means over the batch.
      axis_name: inside ``jax.pmap``, the axis the batch is split over: the
        losses, the norms ``||G_k||`` and the gradients are then reduced over
        the D devices so that the result is that of one device on the whole
        batch. This assumes every device holds the same number of samples and
        ``loss_fn`` returns means over its local batch (the global mean loss is
        then the ``pmean`` of the local ones). ``None``: no reduction (one
        device, or ``jax.jit`` with sharded inputs, where XLA makes the
        batch-wide reductions global).

    Returns:
      ``(grads, stats, metrics)``: ``grads`` with the structure of
      ``params``; updated ``stats``; ``metrics`` with ``losses``,
      ``normalized_losses``, ``grad_norms`` (``||G_k||``), ``task_weights``
      (the coefficients c with backbone gradient ``sum_k c_k G_k``) and
      ``alignment`` (``<U_k, V>`` on the rotated block, at most 1). With
      ``axis_name``, all of them are global and the same on every device.

    Raises:
      ValueError: ``loss_fn`` does not return ``[K]`` or ``params`` lacks the
        RotoGrad parameters.
    """
    if ROTOGRAD_KEY not in params:
        raise ValueError(f"`params` has no {ROTOGRAD_KEY!r} entry: pass the params of a RotoGrad module.")
    k, m = model.num_tasks, model.rotated_size
    rot_params = params[ROTOGRAD_KEY]
    model_params = {key: v for key, v in params.items() if key != ROTOGRAD_KEY}

    def with_rot(mp: Any) -> dict[str, Any]:
        return {**mp, ROTOGRAD_KEY: rot_params}

    def psum(tree: Any) -> Any:
        # Sums over the samples (and the gradients, which are such sums) become sums over all devices.
        return tree if axis_name is None else jax.lax.psum(tree, axis_name)

    # Backbone: one forward, its VJP applied once to the combined gradient on z.
    z, encode_vjp = jax.vjp(
        lambda mp: model.apply({"params": with_rot(mp)}, x, method="encode"), model_params
    )
    rotations = jax.lax.stop_gradient(model.apply({"params": params}, method="rotation_matrices"))

    def task_losses(mp: Any, zz: jax.Array) -> jax.Array:
        return loss_fn(model.apply({"params": with_rot(mp)}, zz, rotations, method="decode"), targets)

    losses, heads_vjp = jax.vjp(task_losses, model_params, z)
    if jnp.shape(losses) != (k,):
        raise ValueError(
            f"`loss_fn` must return the K={k} task losses as shape ({k},); got {jnp.shape(losses)}."
        )
    if axis_name is not None:
        # Equal local batches: the global mean loss is the mean of the local means.
        losses = jax.lax.pmean(losses, axis_name)

    reset = (stats.step == 0) | (stats.step == model.burn_in_period)
    plain = jax.lax.stop_gradient(losses).astype(jnp.float32)
    initial_losses = jnp.where(reset, plain, stats.initial_losses)
    normalized = plain / _nonzero(initial_losses)
    cot = 1.0 / _nonzero(initial_losses) if model.normalize_losses else jnp.ones((k,), jnp.float32)
    if axis_name is not None:
        # d(global mean)/d(local mean) = 1/D: the VJPs then give the local rows of the global G_k and
        # this device's share of the head gradients, whose psum is the global one.
        cot = cot / jax.lax.psum(1, axis_name)
    # K batched VJPs of the heads: per-task head gradients and G_k = dL_k/dz.
    head_grads, zgrads = jax.vmap(heads_vjp)(jnp.diag(cot).astype(losses.dtype))
    head_grads = jax.tree.map(lambda g: jnp.sum(g, axis=0), head_grads)
    zgrads32 = zgrads.astype(jnp.float32)
    norms = jnp.maximum(jnp.sqrt(psum(jnp.sum(zgrads32.reshape(k, -1) ** 2, axis=1))), 1e-15)
    initial_grad_norms = jnp.where(reset, norms, stats.initial_grad_norms)

    current_w = jax.lax.stop_gradient(model.apply({"params": params}, method="task_weights"))
    if model.variant == "rotate_only":
        coeffs = jnp.ones((k,), jnp.float32)
    elif model.variant == "rotograd":
        conv = norms / initial_grad_norms
        alphas = conv / jnp.maximum(jnp.sum(conv), 1e-15)
        coeffs = jnp.sum(alphas * norms) / norms
    else:
        coeffs = current_w
    dz = jnp.tensordot(coeffs, zgrads32, axes=1).astype(z.dtype)
    (backbone_grads,) = encode_vjp(dz)
    model_grads = psum(jax.tree.map(jnp.add, backbone_grads, head_grads))

    # Rotation (and RotoGradNorm weight) gradients, from their own objective.
    expand = (slice(None),) + (None,) * (zgrads32.ndim - 1)
    direction = jnp.mean(zgrads32 / norms[expand], axis=0)[..., :m]  # v, on the rotated block
    rotated = jax.vmap(rotate)(zgrads32, rotations)[..., :m]  # gt_k = dL_k/dr_k

    def alignment_loss(rp: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        # A sum over this device's samples: its value and gradient are psum-ed below. (A psum inside
        # the differentiated function would not do: under pmap its transpose is a psum too, giving D x.)
        r = rotation_matrices(rp["rotations"], model.parametrization)
        back = jnp.einsum("kij,k...i->k...j", r, rotated)  # R_k^T gt_k
        align = jnp.sum((back * direction[None]).reshape(k, -1), axis=1) / norms
        return -jnp.sum(align), align

    (_, align), rot_grads = jax.value_and_grad(alignment_loss, has_aux=True)(rot_params)
    align, rot_grads = psum((align, rot_grads))
    if model.variant == "rotogradnorm":
        # Only global quantities enter the GradNorm term: it is computed, and differentiated, once
        # per device without a psum (which would count it D times).
        mean_grad = jnp.tensordot(current_w, zgrads32, axes=1) / k
        ratio = normalized / _nonzero(jnp.mean(normalized))
        gradnorm_target = jnp.sqrt(psum(jnp.sum(mean_grad**2))) * jnp.maximum(ratio, 0.0) ** model.alpha

        def gradnorm_loss(rp: dict[str, jax.Array]) -> jax.Array:
            return jnp.sum(jnp.abs(norms * norm_weights(rp["weight_logits"]) - gradnorm_target))

        rot_grads = jax.tree.map(jnp.add, rot_grads, jax.grad(gradnorm_loss)(rot_params))

    grads = {**model_grads, ROTOGRAD_KEY: rot_grads}
    grads = FrozenDict(grads) if isinstance(params, FrozenDict) else grads
    new_stats = RotoGradStats(stats.step + 1, initial_losses, initial_grad_norms, stats.skipped)
    metrics = {
        "losses": losses,
        "normalized_losses": normalized,
        "grad_norms": norms,
        "task_weights": coeffs,
        "alignment": align,
    }
    return grads, new_stats, metrics


def _nonzero(x: jax.Array) -> jax.Array:
    return jnp.where(x != 0, x, 1.0)
