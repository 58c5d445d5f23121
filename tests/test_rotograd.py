"""RotoGrad for Flax Linen: rotations, gradient routing of the three variants, statistics, optimizer split."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from softadapt_jax.flax.rotograd import (
    RotateOnly,
    RotoGrad,
    RotoGradNorm,
    create_rotograd_train_state,
    expm,
    init_rotograd_stats,
    make_rotograd_pmap_train_step,
    make_rotograd_train_step,
    rotate,
    rotate_back,
    rotation_matrices,
    rotograd_gradients,
    rotograd_optimizer,
)

D, K, B = 4, 2, 16
RNG = np.random.default_rng(0)  # numpy, not jax.random: eager JAX ops at import cost seconds of compiling
X = jnp.asarray(RNG.normal(size=(B, 3)), jnp.float32)
Y = jnp.stack([jnp.sin(X[:, 0]), -jnp.sin(X[:, 0]) + 0.5 * X[:, 1]], axis=1)


class Trunk(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(D)(nn.tanh(nn.Dense(8)(x)))


def loss_fn(preds: list[jax.Array], y: jax.Array) -> jax.Array:
    return jnp.stack(
        [
            jnp.mean((p[:, 0] - y[:, i]) ** 2) * s
            for i, (p, s) in enumerate(zip(preds, (1.0, 4.0), strict=True))
        ]
    )


def build(cls=RotoGrad, **kw) -> tuple[RotoGrad, dict]:
    """A model and its parameters, assembled from the parts' own inits.

    ``model.init`` would run the whole forward eagerly (the rotations' matrix exponential
    included) for every configuration; numpy draws give the same tree (checked in
    ``test_forward_applies_each_tasks_rotation``) at a fraction of the start-up time.
    """
    model = cls(Trunk(), [nn.Dense(1), nn.Dense(1)], latent_size=D, **kw)
    params = {"backbone": BACKBONE_PARAMS, **{f"heads_{k}": HEAD_PARAMS[k] for k in range(K)}}
    m = model.rotated_size
    # Start away from the identity so the rotations matter in every check.
    rot = {"rotations": jnp.asarray(0.3 * RNG.normal(size=(K, m, m)), jnp.float32)}
    if cls is RotoGradNorm:
        rot["weight_logits"] = jnp.zeros((K,))
    return model, {**params, "rotograd": rot}


def dense(n_in: int, n_out: int) -> dict:
    return {
        "kernel": jnp.asarray(RNG.normal(size=(n_in, n_out)) / np.sqrt(n_in), jnp.float32),
        "bias": jnp.asarray(0.1 * RNG.normal(size=n_out), jnp.float32),
    }


BACKBONE_PARAMS = {"Dense_0": dense(8, D), "Dense_1": dense(3, 8)}  # Dense(D) is constructed first
HEAD_PARAMS = [dense(D, 1) for _ in range(K)]


# One model per configuration, built once; the jitted functions below are cached per name, so
# every configuration compiles once however many tests use it (compiling dominates on CPU).
MODELS = {
    "rotate_only": build(RotateOnly),
    "rotograd": build(RotoGrad, rotation_size=3, burn_in_period=3, normalize_losses=True),
    "cayley": build(RotoGrad, rotation_size=3, parametrization="cayley"),
    "norm": build(RotoGradNorm, alpha=1.0),
}


@functools.partial(jax.jit, static_argnames="name")
def gradients(name: str, params: dict, stats) -> tuple:
    return rotograd_gradients(MODELS[name][0], params, stats, X, Y, loss_fn)


@jax.jit
def sgd(params: dict, grads: dict, lr_model: float, lr_rot: float) -> dict:
    """One SGD step with separate learning rates for the model and RotoGrad's parameters."""
    return {
        key: jax.tree.map(
            lambda a, b, key=key: a - (lr_rot if key == "rotograd" else lr_model) * b, params[key], grads[key]
        )
        for key in params
    }


def train(name: str, params: dict, steps: int, lr_model: float, lr_rot: float) -> tuple:
    stats = init_rotograd_stats(K)
    for _ in range(steps):
        grads, stats, metrics = gradients(name, params, stats)
        params = sgd(params, grads, lr_model, lr_rot)
    return params, stats, metrics


def orthogonality_error(r: jax.Array) -> float:
    eye = jnp.eye(r.shape[-1])
    return float(jnp.max(jnp.abs(jnp.einsum("kji,kjl->kil", r, r) - eye)))


@pytest.mark.parametrize("name", ["rotograd", "cayley"])
def test_rotations_stay_orthogonal_after_training(name: str) -> None:
    model, params = MODELS[name]
    # Far from the identity (||W - W^T|| ~ 30: many squarings in expm) and a large rotation step.
    params = {**params, "rotograd": {"rotations": 10.0 * params["rotograd"]["rotations"]}}
    trained, _, metrics = train(name, params, 20, 0.0, 2.0)
    r = model.apply({"params": trained}, method="rotation_matrices")
    chex.assert_shape(r, (K, 3, 3))
    assert orthogonality_error(r) < 1e-5
    np.testing.assert_allclose(jnp.linalg.det(r), 1.0, atol=1e-5)
    moved = jnp.abs(trained["rotograd"]["rotations"] - params["rotograd"]["rotations"])
    assert float(moved.max()) > 0.1
    assert np.all(np.asarray(metrics["alignment"]) <= 1 + 1e-5)


def test_rotation_size_rotates_only_the_leading_coordinates() -> None:
    r = rotation_matrices(jnp.asarray(RNG.normal(size=(3, 3)), jnp.float32))
    z = jnp.asarray(RNG.normal(size=(5, D)), jnp.float32)
    out = rotate(z, r)
    np.testing.assert_allclose(out[:, 3:], z[:, 3:])
    np.testing.assert_allclose(out[:, :3], z[:, :3] @ r.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rotate_back(out, r), z, rtol=1e-5, atol=1e-5)
    # The Taylor scaling-and-squaring exponential agrees with scipy's Pade.
    a = 3.0 * np.random.default_rng(5).normal(size=(5, 5)).astype(np.float32)
    np.testing.assert_allclose(
        expm(jnp.asarray(a)), scipy.linalg.expm(a.astype(np.float64)), rtol=2e-4, atol=2e-4
    )


def test_forward_applies_each_tasks_rotation() -> None:
    model, params = MODELS["rotograd"]
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), X)["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, params)
    preds = model.apply({"params": params}, X)
    z = model.apply({"params": params}, X, method="encode")
    r = model.apply({"params": params}, method="rotation_matrices")
    for k in range(K):
        head = nn.Dense(1).apply({"params": params[f"heads_{k}"]}, rotate(z, r[k]))
        np.testing.assert_allclose(preds[k], head, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        model.apply({"params": params}, X, 1, method="task_prediction"), preds[1], rtol=1e-5
    )


@functools.partial(jax.jit, static_argnames="name")
def plain_sum_grads(name: str, params: dict) -> dict:
    """Gradient of sum_k L_k through the rotated model, rotations held constant."""
    model = MODELS[name][0]
    rot = jax.lax.stop_gradient(params["rotograd"])

    def total(mp):
        return jnp.sum(loss_fn(model.apply({"params": {**mp, "rotograd": rot}}, X), Y))

    return jax.grad(total)({k: v for k, v in params.items() if k != "rotograd"})


def without_rotograd(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != "rotograd"}


def test_rotate_only_routes_the_plain_sum() -> None:
    _, params = MODELS["rotate_only"]
    grads, stats, metrics = gradients("rotate_only", params, init_rotograd_stats(K))
    chex.assert_trees_all_close(
        without_rotograd(grads), plain_sum_grads("rotate_only", params), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(metrics["task_weights"], jnp.ones(K))
    np.testing.assert_allclose(stats.initial_losses, metrics["losses"], rtol=1e-6)
    assert int(stats.step) == 1


def test_rotation_gradient_matches_the_authors_objective_direction() -> None:
    """Our -<R^T gt, v>/||G|| and the library's mean_n ||R m_n - gt_n||^2 have parallel gradients."""
    model, params = MODELS["rotate_only"]
    grads, _, _ = gradients("rotate_only", params, init_rotograd_stats(K))

    @jax.jit
    def library_gradient(params: dict) -> jax.Array:
        z = model.apply({"params": params}, X, method="encode")
        r = model.apply({"params": params}, method="rotation_matrices")

        def task_losses(zz):
            return loss_fn(model.apply({"params": params}, zz, r, method="decode"), Y)

        zgrads = jax.jacrev(task_losses)(z)  # [K, B, D] = G_k
        rotated = jax.vmap(rotate)(zgrads, r)  # gt_k
        mean = zgrads.mean(0)
        m = jnp.mean(jnp.stack([g * jnp.linalg.norm(mean) / jnp.linalg.norm(g) for g in zgrads]), axis=0)

        def library_loss(w):
            rr = rotation_matrices(w)
            return sum(jnp.mean(jnp.sum((rotate(m, rr[k]) - rotated[k]) ** 2, -1)) for k in range(K))

        return jax.grad(library_loss)(params["rotograd"]["rotations"])

    lib = library_gradient(params)
    ours = grads["rotograd"]["rotations"]
    for k in range(K):
        a, b = np.asarray(ours[k]).ravel(), np.asarray(lib[k]).ravel()
        np.testing.assert_allclose(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), 1.0, atol=1e-4)


def test_rotograd_equalises_magnitudes() -> None:
    _, params = MODELS["rotograd"]
    _, _, metrics = gradients("rotograd", params, init_rotograd_stats(K))
    norms = metrics["grad_norms"]
    # At the first step every convergence ratio is 1: C = mean ||G_k||, coefficient C / ||G_k||.
    np.testing.assert_allclose(metrics["task_weights"], jnp.mean(norms) / norms, rtol=1e-5)
    np.testing.assert_allclose(metrics["task_weights"] * norms, jnp.full(K, jnp.mean(norms)), rtol=1e-5)


def test_rotogradnorm_weights_sum_to_k_and_train() -> None:
    model, params = MODELS["norm"]
    trained, _, metrics = train("norm", params, 10, 0.05, 0.5)
    np.testing.assert_allclose(jnp.sum(metrics["task_weights"]), K, rtol=1e-5)
    w = model.apply({"params": trained}, method="task_weights")
    np.testing.assert_allclose(w.sum(), K, rtol=1e-5)
    assert not np.allclose(w, 1.0)


def test_statistics_reset_at_burn_in_and_loss_normalisation() -> None:
    _, params = MODELS["rotograd"]  # burn_in_period=3, normalize_losses=True
    stats, p, seen = init_rotograd_stats(K), params, []
    for _ in range(5):
        g, stats, metrics = gradients("rotograd", p, stats)
        p = jax.tree.map(
            lambda a, b: a - 0.05 * b,
            p,
            without_rotograd(g) | {"rotograd": jax.tree.map(jnp.zeros_like, g["rotograd"])},
        )
        seen.append((np.asarray(metrics["losses"]), np.asarray(stats.initial_losses)))
    np.testing.assert_allclose(seen[0][1], seen[0][0], rtol=1e-6)  # recorded at step 0
    np.testing.assert_allclose(seen[2][1], seen[0][0], rtol=1e-6)  # kept during burn-in
    np.testing.assert_allclose(seen[3][1], seen[3][0], rtol=1e-6)  # re-recorded at step burn_in_period
    np.testing.assert_allclose(seen[4][1], seen[3][0], rtol=1e-6)
    np.testing.assert_allclose(metrics["normalized_losses"], seen[4][0] / seen[3][0], rtol=1e-5)
    # normalize_losses: the heads are trained on L_k / L_k(t0).
    grads, _, m = gradients("rotograd", params, init_rotograd_stats(K))
    ref = plain_sum_grads("rotograd", params)
    chex.assert_trees_all_close(
        grads["heads_1"], jax.tree.map(lambda g: g / m["losses"][1], ref["heads_1"]), rtol=1e-5, atol=1e-7
    )


def test_optimizer_split_between_model_and_rotations() -> None:
    _, params = MODELS["norm"]
    grads = jax.tree.map(jnp.ones_like, params)
    for lr_model, lr_rot in ((0.1, 0.0), (0.0, 0.1)):
        tx = rotograd_optimizer(optax.sgd(lr_model), optax.sgd(lr_rot))
        upd, _ = tx.update(grads, tx.init(params), params)
        for key, sub in upd.items():
            expected = -(lr_rot if key == "rotograd" else lr_model)
            for leaf in jax.tree.leaves(sub):
                np.testing.assert_allclose(leaf, expected, rtol=1e-6)


def test_train_step_and_alignment_improves_on_conflicting_tasks() -> None:
    model, params = MODELS["rotate_only"]
    y = jnp.stack([jnp.sin(X[:, 0]), -jnp.sin(X[:, 0])], axis=1)  # directly opposed targets
    state = create_rotograd_train_state(model, params, rotograd_optimizer(optax.sgd(1e-3), optax.adam(0.05)))
    step = jax.jit(make_rotograd_train_step(model, loss_fn))
    state, first = step(state, X, y)
    for _ in range(40):
        state, last = step(state, X, y)
    assert int(state.step) == 41 and int(state.stats.step) == 41
    assert float(jnp.sum(last["alignment"])) > float(jnp.sum(first["alignment"]))
    assert orthogonality_error(model.apply({"params": state.params}, method="rotation_matrices")) < 1e-5


# RotateOnly routes the plain sum by construction; RotoGradNorm's K softmax weights are 1 for K = 1.
@pytest.mark.parametrize("cls", [RotoGrad])
def test_single_task_reduces_to_the_plain_gradient(cls) -> None:
    kw = {"alpha": 1.5} if cls is RotoGradNorm else {}
    model = cls(Trunk(), [nn.Dense(1)], latent_size=D, **kw)
    rot = {"rotations": jnp.asarray(0.3 * RNG.normal(size=(1, D, D)), jnp.float32)}
    if cls is RotoGradNorm:
        rot["weight_logits"] = jnp.zeros((1,))
    params = {"backbone": BACKBONE_PARAMS, "heads_0": HEAD_PARAMS[0], "rotograd": rot}
    one_loss = lambda preds, y: loss_fn(preds + preds, y)[:1]  # noqa: E731
    rot = params["rotograd"]

    @jax.jit
    def both(p):
        def total(mp):
            return jnp.sum(one_loss(model.apply({"params": {**mp, "rotograd": rot}}, X), Y))

        return rotograd_gradients(model, p, init_rotograd_stats(1), X, Y, one_loss), jax.grad(total)(
            without_rotograd(p)
        )

    (grads, _, metrics), ref = both(params)
    chex.assert_trees_all_close(without_rotograd(grads), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["alignment"], [1.0], rtol=1e-5)  # one task is its own direction


def test_value_errors() -> None:
    heads = [nn.Dense(1), nn.Dense(1)]
    with pytest.raises(ValueError, match="latent_size"):
        RotoGrad(Trunk(), heads, latent_size=0)
    with pytest.raises(ValueError, match="rotation_size"):
        RotoGrad(Trunk(), heads, latent_size=D, rotation_size=D + 1)
    with pytest.raises(ValueError, match="rotation_size"):
        RotoGrad(Trunk(), heads, latent_size=D, rotation_size=0)
    with pytest.raises(ValueError, match="heads"):
        RotoGrad(Trunk(), [], latent_size=D)
    with pytest.raises(ValueError, match="burn_in_period"):
        RotoGrad(Trunk(), heads, latent_size=D, burn_in_period=-1)
    with pytest.raises(ValueError, match="normalize_losses"):
        RotoGrad(Trunk(), heads, latent_size=D, normalize_losses=1)
    with pytest.raises(ValueError, match="parametrization"):
        RotoGrad(Trunk(), heads, latent_size=D, parametrization="qr")
    with pytest.raises(ValueError, match="needs `alpha`"):
        RotoGradNorm(Trunk(), heads, latent_size=D)
    with pytest.raises(ValueError, match="alpha"):
        RotoGradNorm(Trunk(), heads, latent_size=D, alpha=-1.0)
    with pytest.raises(ValueError, match="parametrization"):
        rotation_matrices(jnp.zeros((2, 2)), "qr")
    with pytest.raises(ValueError, match="latent_size=5"):
        jax.eval_shape(RotoGrad(Trunk(), heads, latent_size=5).init, jax.random.PRNGKey(0), X)
    model, params = MODELS["rotograd"]
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        rotograd_gradients(model, params, init_rotograd_stats(K), X, Y, lambda p, y: jnp.zeros(3))
    with pytest.raises(ValueError, match="no 'rotograd'"):
        rotograd_gradients(model, {"backbone": params["backbone"]}, init_rotograd_stats(K), X, Y, loss_fn)
    with pytest.raises(ValueError, match="rotograd"):
        create_rotograd_train_state(model, {"backbone": params["backbone"]}, optax.sgd(0.1))
    with pytest.raises(ValueError, match="index"):
        model.apply({"params": params}, X, 2, method="task_prediction")


# RotoGradNorm runs every cross-device reduction RotoGrad has, and its weights' too.
@pytest.mark.parametrize("name", ["norm"])
def test_sharded_jit_over_four_devices_matches_one_device(name: str) -> None:
    # The documented multi-device path: jit with the batch split over a mesh, state replicated;
    # the batch-wide norms and means become global reductions, so the run equals one device's.
    from jax.sharding import NamedSharding, PartitionSpec

    from softadapt_jax.training import data_mesh

    model, params = MODELS[name]
    tx = rotograd_optimizer(optax.sgd(1e-2), optax.adam(0.05))
    step = make_rotograd_train_step(model, loss_fn)
    single = create_rotograd_train_state(model, params, tx)
    single_step = jax.jit(step)
    for _ in range(5):
        single, m1 = single_step(single, X, Y)

    mesh = data_mesh()
    assert mesh.size == 4
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.device_put(create_rotograd_train_state(model, params, tx), replicated)
    x, y = jax.device_put(X, split), jax.device_put(Y, split)
    sharded_step = jax.jit(
        step, in_shardings=(replicated, split, split), out_shardings=(replicated, replicated)
    )
    for _ in range(5):
        sharded, m4 = sharded_step(sharded, x, y)
    chex.assert_trees_all_close(jax.device_get(sharded.params), single.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jax.device_get(m4), m1, rtol=1e-5, atol=1e-6)


# RotateOnly without loss normalisation, and RotoGradNorm (RotoGrad's reductions and its weights').
@pytest.mark.parametrize(("name", "normalize_losses"), [("rotate_only", False), ("norm", True)])
def test_pmap_over_four_devices_matches_one_device(name: str, normalize_losses: bool) -> None:
    # pmap with axis_name: the losses, norms and gradients are reduced over devices explicitly, so
    # 4 devices with a quarter of the batch each equal one device on the whole batch. Four steps with
    # burn_in_period=2 cover both recordings of L(t0) and ||G^0||.
    from softadapt_jax.training import replicate, shard_batch, unreplicate

    model, params = MODELS[name]
    model = model.clone(burn_in_period=2, normalize_losses=normalize_losses)
    # SGD for both parts: Adam would hide a gradient counted D times (it is invariant to scale).
    tx = rotograd_optimizer(optax.sgd(1e-2), optax.sgd(0.5))
    single = create_rotograd_train_state(model, params, tx)
    single_step = jax.jit(make_rotograd_train_step(model, loss_fn))
    for _ in range(4):
        single, m1 = single_step(single, X, Y)

    assert jax.local_device_count() == 4
    pstep = make_rotograd_pmap_train_step(model, loss_fn, axis_name="batch")
    replicated = replicate(create_rotograd_train_state(model, params, tx))
    x, y = shard_batch(X), shard_batch(Y)
    chex.assert_shape(x, (4, B // 4, 3))
    for _ in range(4):
        replicated, m4 = pstep(replicated, x, y)
    assert int(unreplicate(replicated.stats.step)) == 4

    # Every replica holds bitwise the same state and metrics (all its inputs are global reductions).
    for tree in (replicated.params, replicated.stats, replicated.opt_state, m4):
        for leaf in jax.tree.leaves(jax.device_get(tree)):
            for i in range(1, 4):
                np.testing.assert_array_equal(leaf[i], leaf[0])
    tol = {"rtol": 1e-5, "atol": 1e-6}
    chex.assert_trees_all_close(jax.device_get(unreplicate(replicated.params)), single.params, **tol)
    chex.assert_trees_all_close(
        tuple(jax.device_get(unreplicate(replicated.stats))), tuple(single.stats), **tol
    )
    chex.assert_trees_all_close(jax.device_get(unreplicate(m4)), m1, **tol)
    # The rotations did move, so the comparison covers their (psum-ed) gradient.
    moved = single.params["rotograd"]["rotations"] - params["rotograd"]["rotations"]
    assert float(jnp.max(jnp.abs(moved))) > 1e-3


@pytest.mark.parametrize("cls", [RotoGrad, RotoGradNorm])
def test_nonfinite_step_changes_nothing_and_is_counted(cls) -> None:
    """Issue 15 item 9: a nan batch at the burn-in step used to leave the statistics nan for good."""
    kw = {"alpha": 1.0} if cls is RotoGradNorm else {}
    model, params = build(cls, burn_in_period=1, **kw)
    tx = rotograd_optimizer(optax.adam(1e-2), optax.adam(1e-3))
    state = create_rotograd_train_state(model, params, tx)
    step = jax.jit(make_rotograd_train_step(model, loss_fn))
    state, _ = step(state, X, Y)  # step 0 records L(t0); step 1 is the burn-in re-recording
    bad_x = X.at[2, 1].set(jnp.nan)
    new, metrics = step(state, bad_x, Y)
    assert bool(metrics["skipped"])
    assert int(new.stats.skipped) == 1 and int(new.stats.step) == int(state.stats.step)
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.opt_state, state.opt_state)
    chex.assert_trees_all_equal(new.stats._replace(skipped=state.stats.skipped), state.stats)
    new, metrics = step(new, X, Y)  # the burn-in happens at the next finite step
    assert not bool(metrics["skipped"])
    for leaf in jax.tree.leaves((new.params, new.stats)):
        assert np.all(np.isfinite(np.asarray(leaf)))
