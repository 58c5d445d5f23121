"""Tests of the PINN problems: reference solutions, loss components and training smoke checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import integrate

from problems import (
    PROBLEM_NAMES,
    WANG2021_TRAINING,
    PointStream,
    burgers_exact,
    burgers_reference_grid,
    burgers_residual,
    cached_burgers_reference,
    get_problem,
    helmholtz_exact,
    helmholtz_residual,
    helmholtz_source,
    helmholtz_wang2021_problem,
    input_moments,
    mlp_apply,
    standardize,
    wave_exact,
    wave_residual,
    wave_velocity,
)
from problems.burgers import NU

HELMHOLTZ_COMPONENTS = ("residual", "left", "right", "bottom", "top")
EXPECTED_COMPONENTS = {
    "burgers": ("residual", "initial", "left", "right"),
    "helmholtz": HELMHOLTZ_COMPONENTS,
    "helmholtz_wang2021": HELMHOLTZ_COMPONENTS,
    "wave": ("residual", "initial", "left", "right", "velocity"),
}
# (lower, upper) corner of each problem's domain, columns as in its batch.
DOMAINS = {
    "burgers": ((-1.0, 0.0), (1.0, 1.0)),
    "helmholtz": ((-1.0, -1.0), (1.0, 1.0)),
    "helmholtz_wang2021": ((-1.0, -1.0), (1.0, 1.0)),
    "wave": ((0.0, 0.0), (1.0, 1.0)),
}
HELMHOLTZ_EDGES = {"left": (0, -1.0), "right": (0, 1.0), "bottom": (1, -1.0), "top": (1, 1.0)}
# name -> (pinned axis, value) of each boundary/initial set.
PINNED = {
    "burgers": {"initial": (1, 0.0), "left": (0, -1.0), "right": (0, 1.0)},
    "helmholtz": HELMHOLTZ_EDGES,
    "helmholtz_wang2021": HELMHOLTZ_EDGES,
    "wave": {"initial": (1, 0.0), "left": (0, 0.0), "right": (0, 1.0), "velocity": (1, 0.0)},
}


# helmholtz_wang2021 is helmholtz with other options (test_helmholtz_wang2021_is_the_authors_set_up).
@pytest.fixture(scope="module", params=[name for name in PROBLEM_NAMES if name != "helmholtz_wang2021"])
def problem(request):
    return get_problem(request.param)


@pytest.fixture(scope="module")
def losses_and_grad(problem):
    """Jitted ``(params, batch) -> (losses [K], grad of their sum)``, compiled once per problem."""

    @jax.jit
    def fn(params, batch):
        losses, vjp = jax.vjp(lambda p: problem.loss_components(p, batch), params)
        return losses, vjp(jnp.ones_like(losses))[0]

    return fn


# --------------------------------------------------------------------------- Burgers reference


def _burgers_quad(x: float, t: float, nu: float = NU) -> float:
    """Cole-Hopf integrals in η by adaptive quadrature, independent of Gauss-Hermite."""

    def exponent(eta):
        return -np.cos(np.pi * (x - eta)) / (2 * np.pi * nu) - eta**2 / (4 * nu * t)

    # Beyond 20 Gaussian widths the weight is < e^-400, which outweighs f's e^±50 swing.
    half_width = 20 * np.sqrt(4 * nu * t)
    shift = exponent(np.linspace(-half_width, half_width, 20001)).max()
    kwargs = {"limit": 500, "epsabs": 0.0, "epsrel": 1e-13, "points": [0.0]}
    num = integrate.quad(
        lambda e: np.sin(np.pi * (x - e)) * np.exp(exponent(e) - shift), -half_width, half_width, **kwargs
    )[0]
    den = integrate.quad(lambda e: np.exp(exponent(e) - shift), -half_width, half_width, **kwargs)[0]
    return -num / den


@pytest.mark.parametrize(
    ("x", "t"),
    [(0.5, 0.5), (0.01, 1 / np.pi), (0.003, 1.0), (-0.3, 0.9), (0.9, 0.05), (-0.97, 0.7), (0.2, 0.01)],
)
def test_burgers_exact_matches_adaptive_quadrature(x, t):
    assert burgers_exact(x, t) == pytest.approx(_burgers_quad(x, t), abs=1e-8)


def test_burgers_quadrature_is_converged():
    x = np.linspace(-1, 1, 65)[:, None]
    t = np.linspace(0, 1, 21)[None, :]
    fine = burgers_exact(x, t, num_nodes=350)
    np.testing.assert_allclose(burgers_exact(x, t, num_nodes=250), fine, atol=1e-12)


def test_burgers_reference_grid_initial_boundary_and_symmetry():
    x, t, u = burgers_reference_grid(nx=65, nt=21)
    assert x.shape == (65,) and t.shape == (21,) and u.shape == (65, 21)
    assert u.dtype == np.float64
    np.testing.assert_array_equal(u[:, 0], -np.sin(np.pi * x))
    np.testing.assert_allclose(u[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(u[-1], 0.0, atol=1e-12)
    np.testing.assert_allclose(u[::-1], -u, atol=1e-12)


def test_burgers_fd_residual_small_away_from_shock():
    # Points with |x| >= 0.1 stay clear of the shock (at x = 0, width ~0.005).
    xs = np.concatenate([-np.linspace(0.1, 0.95, 18), np.linspace(0.1, 0.95, 18)])
    x, t = np.meshgrid(xs, np.linspace(0.05, 1.0, 20))

    def fd_residual(h):
        u = burgers_exact(x, t)
        up, um = burgers_exact(x + h, t), burgers_exact(x - h, t)
        u_t = (burgers_exact(x, t + h) - burgers_exact(x, t - h)) / (2 * h)
        return u_t + u * (up - um) / (2 * h) - NU * (up - 2 * u + um) / h**2

    coarse, fine = np.abs(fd_residual(1e-3)).max(), np.abs(fd_residual(1e-4)).max()
    assert coarse < 2e-4
    # O(h²) decay shows the residual left is truncation error, not a flaw of the solution.
    assert fine < 2e-6
    assert 50 < coarse / fine < 200


def test_burgers_shock_slope_matches_basdevant():
    # Basdevant et al. (1986): the steepest slope at x = 0, -152.00516, occurs at
    # t = 1.6037 / pi. (At t = 1/pi the slope is only about -34.2.)
    def slope(t, h=1e-6):
        return (burgers_exact(h, t) - burgers_exact(-h, t)) / (2 * h)

    t_star = 1.6037 / np.pi
    assert slope(t_star) == pytest.approx(-152.00516, rel=1e-6)
    assert slope(t_star) < min(slope(1.55 / np.pi), slope(1.65 / np.pi))


def test_cached_burgers_reference_is_cached_and_read_only():
    first = cached_burgers_reference(33, 11)
    assert cached_burgers_reference(33, 11) is first
    with pytest.raises(ValueError, match="read-only"):
        first[2][0, 0] = 1.0


def test_burgers_exact_validates_arguments():
    with pytest.raises(ValueError, match="num_nodes"):
        burgers_exact(0.0, 0.5, num_nodes=1000)
    with pytest.raises(ValueError, match="t must be"):
        burgers_exact(0.0, -0.1)


# --------------------------------------------------------------------------- Helmholtz exact


def test_helmholtz_exact_satisfies_pde_and_boundary():
    with jax.enable_x64(True):

        def u(p):
            return helmholtz_exact(p[0], p[1])

        @jax.jit
        def pde_residual(points):
            laplacian = jax.vmap(lambda p: jnp.trace(jax.hessian(u)(p)))(points)
            return laplacian + jax.vmap(u)(points) - helmholtz_source(points[:, 0], points[:, 1])

        points = jax.random.uniform(jax.random.key(0), (64, 2), minval=-1.0, maxval=1.0)
        assert points.dtype == jnp.float64
        residual = pde_residual(points)
        # |q| <= 17 pi² ≈ 168, so 1e-10 is ~1e-12 relative.
        assert float(jnp.max(jnp.abs(residual))) < 1e-10

        s = jnp.linspace(-1.0, 1.0, 101)
        edges = [helmholtz_exact(-1.0, s), helmholtz_exact(1.0, s), helmholtz_exact(s, -1.0)]
        edges.append(helmholtz_exact(s, 1.0))
        assert float(jnp.max(jnp.abs(jnp.stack(edges)))) < 1e-14


# --------------------------------------------------------------------------- wave exact


def test_wave_exact_satisfies_pde_initial_and_boundary_conditions():
    with jax.enable_x64(True):

        def u(p):
            return wave_exact(p[0], p[1])

        @jax.jit
        def pde_residual(points):
            hess = jax.vmap(jax.hessian(u))(points)
            return hess[:, 1, 1] - 4.0 * hess[:, 0, 0]

        points = jax.random.uniform(jax.random.key(0), (64, 2))
        # |u_tt| <= 64 pi² ≈ 630, so 1e-9 is ~1e-12 relative.
        assert float(jnp.max(jnp.abs(pde_residual(points)))) < 1e-9

        s = jnp.linspace(0.0, 1.0, 101)
        np.testing.assert_allclose(
            wave_exact(s, 0.0), jnp.sin(np.pi * s) + 0.5 * jnp.sin(4 * np.pi * s), atol=1e-15
        )
        assert float(jnp.max(jnp.abs(jnp.stack([wave_exact(0.0, s), wave_exact(1.0, s)])))) < 1e-14
        velocity = jax.vmap(jax.grad(lambda t, x: wave_exact(x, t)), in_axes=(None, 0))(0.0, s)
        assert float(jnp.max(jnp.abs(velocity))) < 1e-14


# --------------------------------------------------------------------------- Problem interface


def test_get_problem_unknown_name_lists_known():
    with pytest.raises(
        ValueError,
        match=r"unknown problem 'heat'; known problems: burgers, helmholtz, helmholtz_wang2021, wave",
    ):
        get_problem("heat")


def test_get_problem_forwards_options():
    problem = get_problem("burgers", hidden=(8,), num_residual=16)
    params = problem.init_params(jax.random.key(0))
    assert [layer["w"].shape for layer in params] == [(2, 8), (8, 1)]
    assert problem.sample_batch(jax.random.key(0))["residual"].shape == (16, 2)


def test_problem_metadata(problem):
    assert problem.component_names == EXPECTED_COMPONENTS[problem.name]
    assert problem.num_losses == len(problem.component_names)


def test_batch_points_lie_where_they_should(problem):
    batch = {name: np.asarray(pts) for name, pts in problem.sample_batch(jax.random.key(3)).items()}
    assert set(batch) == set(problem.component_names)  # jit returns dicts sorted by key
    for name, pts in batch.items():
        assert pts.ndim == 2 and pts.shape[1] == 2, name
    lower, upper = (np.asarray(c) for c in DOMAINS[problem.name])
    for name, pts in batch.items():
        assert np.all((pts >= lower) & (pts <= upper)), name
    assert np.all(np.std(batch["residual"], axis=0) > 0.1)
    for name, (axis, value) in PINNED[problem.name].items():
        assert np.all(batch[name][:, axis] == value), name
        assert np.std(batch[name][:, 1 - axis]) > 0.1, name


def test_sample_batch_is_deterministic_per_key(problem):
    a, b = problem.sample_batch(jax.random.key(1)), problem.sample_batch(jax.random.key(1))
    c = problem.sample_batch(jax.random.key(2))
    for name in problem.component_names:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])


def test_loss_components_shape_finite_and_jittable(problem, losses_and_grad):
    params = problem.init_params(jax.random.key(0))
    batch = problem.sample_batch(jax.random.key(1))
    losses, grads = losses_and_grad(params, batch)
    losses = np.asarray(losses)
    assert losses.shape == (problem.num_losses,)
    assert np.all(np.isfinite(losses)) and np.all(losses >= 0)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The boundary/initial displacement terms, recomputed from predict (the wave's velocity
    # term is a derivative, checked in test_batched_derivatives_match_per_point_autodiff).
    names = [name for name in problem.component_names[1:] if name != "velocity"]
    # One predict call for all sets: each new input shape would cost a compile.
    u = np.asarray(problem.predict(params, jnp.concatenate([batch[name] for name in names])))
    sizes = np.cumsum([batch[name].shape[0] for name in names])[:-1]
    errors = dict(zip(names, np.split(u, sizes), strict=True))
    x0 = np.asarray(batch["initial"][:, 0]) if "initial" in batch else None
    if problem.name == "burgers":
        errors["initial"] = errors["initial"] + np.sin(np.pi * x0)
    if problem.name == "wave":
        errors["initial"] = errors["initial"] - wave_exact(x0, 0.0)
    expected = [np.mean(errors[name] ** 2) for name in names]
    got = [losses[problem.component_names.index(name)] for name in names]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_predict_reference_and_relative_error(problem):
    params = problem.init_params(jax.random.key(0))
    points, u_ref = problem.reference()
    assert points.ndim == 2 and points.shape == (u_ref.shape[0], 2)
    assert problem.reference()[0] is points  # cached
    u = problem.predict(params, jnp.asarray(points))
    assert u.shape == u_ref.shape
    expected = np.linalg.norm(np.asarray(u) - u_ref) / np.linalg.norm(u_ref)
    np.testing.assert_allclose(jax.jit(problem.relative_l2_error)(params), expected, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "standardized"),
    [("burgers", False), ("burgers", True), ("helmholtz", False), ("helmholtz", True), ("wave", True)],
)
def test_batched_derivatives_match_per_point_autodiff(name, standardized):
    # The residuals use batched forward mode; per-point hessians of predict (which applies
    # the input map) are the slow ground truth, so the standardisation's chain rule is checked too.
    # A small network keeps compilation cheap; the derivative code does not depend on size.
    problem = get_problem(name, hidden=(16, 16), num_residual=32, standardize_inputs=standardized)
    moments = input_moments(*DOMAINS[name]) if standardized else None
    with jax.enable_x64(True):
        params = problem.init_params(jax.random.key(0))
        points = problem.sample_batch(jax.random.key(1))["residual"]

        @jax.jit
        def both(params, points):
            def u(p):
                return problem.predict(params, p[None])[0]

            value = jax.vmap(u)(points)
            grad, hess = jax.vmap(jax.grad(u))(points), jax.vmap(jax.hessian(u))(points)
            if name == "burgers":
                expected = grad[:, 1] + value * grad[:, 0] - NU * hess[:, 0, 0]
                return (burgers_residual(params, points, moments=moments),), (expected,)
            if name == "wave":
                expected = hess[:, 1, 1] - 4.0 * hess[:, 0, 0]
                got = (
                    wave_residual(params, points, moments=moments),
                    wave_velocity(params, points, moments=moments),
                )
                return got, (expected, grad[:, 1])
            source = helmholtz_source(points[:, 0], points[:, 1])
            expected = hess[:, 0, 0] + hess[:, 1, 1] + value - source
            return (helmholtz_residual(params, points, moments=moments),), (expected,)

        got, expected = both(params, points)
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == jnp.float64
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10)
        # The problem's own loss uses the same residual.
        residual = problem.residuals(params, problem.sample_batch(jax.random.key(1)))[0]
        np.testing.assert_allclose(residual, got[0], rtol=1e-12, atol=1e-12)


_ADAM = optax.adam(1e-3)


@jax.jit
def _adam_update(params, grads, state):
    updates, state = _ADAM.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_adam_reduces_summed_loss(problem, losses_and_grad):
    params = problem.init_params(jax.random.key(0))
    batch = problem.sample_batch(jax.random.key(1))
    state = _ADAM.init(params)
    initial = float(losses_and_grad(params, batch)[0].sum())
    for _ in range(200):
        params, state = _adam_update(params, losses_and_grad(params, batch)[1], state)
    final = float(losses_and_grad(params, batch)[0].sum())
    assert np.isfinite(final) and final < 0.5 * initial


# --------------------------------------------------------------------------- collocation stream


@pytest.mark.parametrize("resample", [False, True])
def test_point_stream_fixed_or_fresh_inside_a_scan(resample):
    problem = get_problem("helmholtz", hidden=(4,), num_residual=8, num_boundary=4, resample=resample)
    assert problem.resample is resample

    @jax.jit
    def three_steps(key):
        def body(stream, _):
            batch, stream = problem.next_points(stream)
            return stream, batch["residual"]

        return jax.lax.scan(body, problem.init_points(key), None, length=3)

    stream, residual_points = three_steps(jax.random.key(0))
    assert isinstance(stream, PointStream)
    assert residual_points.shape == (3, 8, 2)
    if resample:
        assert not np.array_equal(residual_points[0], residual_points[1])
        assert not np.array_equal(residual_points[1], residual_points[2])
        np.testing.assert_array_equal(stream.batch["residual"], residual_points[-1])
    else:
        np.testing.assert_array_equal(residual_points[0], residual_points[2])
        np.testing.assert_array_equal(
            residual_points[0], problem.init_points(jax.random.key(0)).batch["residual"]
        )
    # Same key, same stream.
    np.testing.assert_array_equal(three_steps(jax.random.key(0))[1], residual_points)


def test_input_moments_are_the_uniform_moments_and_deterministic():
    mean, std = input_moments((-1.0, 0.0), (1.0, 1.0))
    # 100,000 draws: the sample moments are within ~4 standard errors of the exact ones.
    standard_error = np.array([2.0, 1.0]) / np.sqrt(12 * 1e5)
    assert np.all(np.abs(mean - [0.0, 0.5]) < 4 * standard_error)
    np.testing.assert_allclose(std, [2 / np.sqrt(12), 1 / np.sqrt(12)], rtol=1e-2)
    again = input_moments((-1.0, 0.0), (1.0, 1.0))
    np.testing.assert_array_equal(again[0], mean)
    with pytest.raises(ValueError, match="read-only"):
        mean[0] = 1.0
    x = jnp.ones((3, 2))
    np.testing.assert_allclose(standardize(x, (mean, std)), (np.ones((3, 2)) - mean) / std, rtol=1e-6)
    assert standardize(x, None) is x


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lower": (0.0,), "upper": (1.0,), "num": 1}, "`num` must be an int >= 2, got 1"),
        ({"lower": (0.0, 1.0), "upper": (1.0, 1.0)}, "`upper` must exceed `lower` on every axis"),
        ({"lower": (0.0,), "upper": (1.0, 2.0)}, "`upper` must exceed `lower` on every axis"),
    ],
)
def test_input_moments_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        input_moments(**kwargs)


def test_helmholtz_wang2021_is_the_authors_set_up():
    problem = helmholtz_wang2021_problem()
    assert problem.name == "helmholtz_wang2021"
    assert problem.resample and problem.term_groups == (0, 1, 1, 1, 1)
    params = problem.init_params(jax.random.key(0))
    assert [layer["w"].shape for layer in params] == [(2, 50), (50, 50), (50, 50), (50, 1)]
    assert all(np.all(np.asarray(layer["b"]) == 0) for layer in params)
    # Glorot normal: std sqrt(2 / (fan_in + fan_out)) = sqrt(1 / 50) for the 50 x 50 layers.
    hidden_w = np.concatenate([np.ravel(params[1]["w"]), np.ravel(params[2]["w"])])
    assert np.std(hidden_w) == pytest.approx(np.sqrt(1 / 50), rel=0.05)
    batch = problem.sample_batch(jax.random.key(1))
    assert {name: pts.shape for name, pts in batch.items()} == {
        name: (128, 2) for name in HELMHOLTZ_COMPONENTS
    }
    points, u_ref = problem.reference()
    grid = np.linspace(-1.0, 1.0, 100)
    assert points.shape == (10_000, 2)
    np.testing.assert_array_equal(np.unique(points[:, 0]), grid)
    np.testing.assert_array_equal(np.unique(points[:, 1]), grid)
    np.testing.assert_allclose(u_ref, np.sin(np.pi * points[:, 0]) * np.sin(4 * np.pi * points[:, 1]))
    # Standardised inputs: the network sees (X - mean) / std, std ~ 1/sqrt(3).
    mean, std = input_moments((-1.0, -1.0), (1.0, 1.0))
    np.testing.assert_allclose(std, 1 / np.sqrt(3), rtol=1e-2)
    x = batch["residual"]
    direct = mlp_apply(params, (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype))[:, 0]
    np.testing.assert_allclose(problem.predict(params, x), direct, rtol=1e-5, atol=1e-6)
    assert WANG2021_TRAINING == {
        "learning_rate": 1e-3,
        "decay_rate": 0.9,
        "decay_steps": 1000,
        "steps": 40_001,
    }
    # Overrides replace the authors' options.
    small = get_problem("helmholtz_wang2021", hidden=(8,), resample=False)
    assert not small.resample
    assert [layer["w"].shape for layer in small.init_params(jax.random.key(0))] == [(2, 8), (8, 1)]
