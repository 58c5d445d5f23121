"""Gradient-norm and NTK weighting against jaxpi (tests/data/jaxpi_weighting.json), in float64.

The reference is jaxpi at commit e85b694 (``PINN.compute_weights``, ``update_weights``,
``TrainState.apply_weights``, ``utils.ntk_fn``). Its networks are rebuilt from the recorded flax
parameters (``jaxpi/archs.py`` ``Mlp``: periodic and Fourier embeddings, weight-factorised
kernels ``g * v``), the problems from ``examples/burgers/models.py`` and the README's 1-D Poisson
set-up (``-u'' = pi^2 sin(pi x)``, ``u(0) = u(1) = 0``, observations of ``sin(pi x)``; the residual
form is the one whose losses match the recorded ones). The statistic is computed by the library's
own code path (``compute_statistic`` with the balancer's options) and the weights by the balancer;
both are compared at ``rtol=1e-6``. Exception: jaxpi's causal NTK (residual kernel averaged per
time chunk and scaled by the causal weights) is another method (issue 18), so for
``burgers_causal_fancy`` the NTK rule is checked on the recorded ``ntk_diag``.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softadapt_jax as sj
from softadapt_jax.statistics import compute_statistic

DATA = pathlib.Path(__file__).parent / "data" / "jaxpi_weighting.json"
RTOL = 1e-6


@functools.cache
def reference() -> dict:
    return json.loads(DATA.read_text())


def mlp_apply(arch: dict):
    """jaxpi's ``Mlp.__call__`` on one input vector."""

    def apply(params: dict, z: jax.Array) -> jax.Array:
        p = params["params"]
        if arch["periodicity"]:
            axes, periods = arch["periodicity"]["axis"], arch["periodicity"]["period"]
            parts = []
            for i in range(z.shape[-1]):
                if i in axes:
                    w = periods[axes.index(i)]
                    parts += [jnp.cos(w * z[i]), jnp.sin(w * z[i])]
                else:
                    parts.append(z[i])
            z = jnp.stack(parts)
        if arch["fourier_emb"]:
            kernel = p["FourierEmbs_0"]["kernel"]
            z = jnp.concatenate([jnp.cos(z @ kernel), jnp.sin(z @ kernel)])
        for layer in range(arch["num_layers"] + 1):
            dense = p[f"Dense_{layer}"]
            kernel = dense["kernel"]
            if arch["reparam"]:
                kernel = kernel[0] * kernel[1]  # weight_fact: (g, v)
            z = z @ kernel + dense["bias"]
            if layer < arch["num_layers"]:
                z = jnp.tanh(z)
        return z

    return apply


def burgers(problem: dict):
    """``(losses, residuals, keys)`` of jaxpi's Burgers example (terms in sorted-key order)."""
    apply, cfg = mlp_apply(problem["arch"]), problem["weighting"]
    x_star, u0, t0 = jnp.asarray(problem["x_star"]), jnp.asarray(problem["u0"]), problem["t0"]

    def u(p, t, x):
        return apply(p, jnp.stack([t, x]))[0]

    def r(p, t, x):
        # Forward-mode derivatives (jaxpi takes them with grad; same values, quicker to compile).
        u_t = jax.jvp(lambda s: u(p, s, x), (t,), (1.0,))[1]
        (u_val, u_x), (_, u_xx) = jax.jvp(lambda y: jax.jvp(lambda z: u(p, t, z), (y,), (1.0,)), (x,), (1.0,))
        return u_t + u_val * u_x - 0.01 / jnp.pi * u_xx

    def residuals(p, batch):
        initial = jax.vmap(u, (None, None, 0))(p, t0, x_star) - u0
        return initial, jax.vmap(r, (None, 0, 0))(p, batch[:, 0], batch[:, 1])

    def losses(p, batch):
        initial, res = residuals(p, batch)
        if cfg["use_causal"]:
            # jaxpi sorts the times only (not the x paired with them), then weighs time chunks.
            n = cfg["num_chunks"]
            chunks = jax.vmap(r, (None, 0, 0))(p, jnp.sort(batch[:, 0]), batch[:, 1]).reshape(n, -1)
            chunk_losses = jnp.mean(chunks**2, axis=1)
            earlier = jnp.tril(jnp.ones((n, n)), -1) @ chunk_losses
            causal = jax.lax.stop_gradient(jnp.exp(-cfg["causal_tol"] * earlier))
            res_loss = jnp.mean(chunk_losses * causal)
        else:
            res_loss = jnp.mean(res**2)
        return jnp.stack([jnp.mean(initial**2), res_loss])

    return losses, residuals, ("ics", "res")


def poisson1d(problem: dict):
    apply = mlp_apply(problem["arch"])
    x_bc, x_obs, u_obs = (jnp.asarray(problem[k]) for k in ("x_bc", "x_obs", "u_obs"))

    def u(p, x):
        return apply(p, jnp.stack([x]))[0]

    def r(p, x):
        u_xx = jax.jvp(lambda y: jax.jvp(lambda z: u(p, z), (y,), (1.0,))[1], (x,), (1.0,))[1]
        return u_xx + jnp.pi**2 * jnp.sin(jnp.pi * x)

    def residuals(p, batch):
        on = jax.vmap(u, (None, 0))
        return on(p, x_bc), on(p, x_obs) - u_obs, jax.vmap(r, (None, 0))(p, batch[:, 0])

    def losses(p, batch):
        return jnp.stack([jnp.mean(z**2) for z in residuals(p, batch)])

    return losses, residuals, ("bc", "obs", "res")


def problem_fns(name: str):
    problem = reference()["problems"][name]
    return (poisson1d if name == "poisson1d" else burgers)(problem)


def cases(scheme: str, problem: str) -> list[dict]:
    return [c for c in reference()["methods"][scheme]["cases"] if c["inputs"]["problem"] == problem]


def as_params(tree, arch: dict):
    """The recorded flax tree as arrays; weight_fact Dense kernels are the pair [g, v]."""

    params = {"params": {}}
    for layer, leaves in tree["params"].items():
        params["params"][layer] = {}
        for key, value in leaves.items():
            if arch["reparam"] and layer.startswith("Dense") and key == "kernel":
                params["params"][layer][key] = [jnp.asarray(value[0]), jnp.asarray(value[1])]
            else:
                params["params"][layer][key] = jnp.asarray(value)
    return params


def stacked(trees: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def per_case(cs: list[dict], keys: tuple[str, ...], field: str, where: str = "expected") -> np.ndarray:
    return np.array([[c[where][field][k] for k in keys] for c in cs])


def balancers(scheme: str, k: int) -> tuple[sj.Balancer, sj.Balancer]:
    """The default balancer, and the same with momentum 0 (its weights are the raw estimate)."""
    factory = sj.inverse_grad_norm_balancer if scheme == "grad_norm" else sj.ntk_balancer
    return factory(num_losses=k, update_every=10), factory(num_losses=k, update_every=10, momentum=0.0)


def updated_weights(balancer: sj.Balancer, losses, before, stats) -> jax.Array:
    state = balancer.init()
    state = state._replace(method_state=state.method_state._replace(ema=before))
    weights, _ = balancer.update(losses, state, stats)
    return weights


SCHEME_PROBLEMS = [
    (scheme, problem)
    for scheme in ("grad_norm", "ntk")
    for problem in ("burgers_plain", "burgers_causal_fancy", "poisson1d")
    if not (scheme == "ntk" and problem == "burgers_causal_fancy")
]


@pytest.mark.parametrize("scheme, problem", SCHEME_PROBLEMS)
def test_rebuilt_problem_weights(x64, scheme: str, problem: str) -> None:
    cs = cases(scheme, problem)
    losses_fn, residuals_fn, keys = problem_fns(problem)
    default, raw = balancers(scheme, len(keys))
    options = dict(default.statistic_options)
    assert options["params_filter"] == "all"  # jaxpi differentiates every parameter

    def one_case(params, batch, before):
        stats = compute_statistic(
            default.statistic, losses_fn, params, batch, residuals_fn=residuals_fn, **options
        )
        losses = losses_fn(params, batch)
        return (
            losses,
            stats,
            updated_weights(raw, losses, before, stats),
            updated_weights(default, losses, before, stats),
        )

    arch = reference()["problems"][problem]["arch"]
    params = stacked([as_params(c["inputs"]["params"], arch) for c in cs])
    batch = jnp.asarray(np.stack([c["inputs"]["batch"] for c in cs]))
    before = jnp.asarray(per_case(cs, keys, "weights_before_update", "inputs"))
    losses, stats, w_raw, w_after = jax.jit(jax.vmap(one_case))(params, batch, before)

    np.testing.assert_allclose(losses, per_case(cs, keys, "losses"), rtol=1e-12)  # the rebuild itself
    statistic_field = "grad_norms" if scheme == "grad_norm" else "ntk_diag_mean"
    np.testing.assert_allclose(stats, per_case(cs, keys, statistic_field), rtol=RTOL)
    np.testing.assert_allclose(w_raw, per_case(cs, keys, "computed_weights_raw"), rtol=RTOL)
    np.testing.assert_allclose(w_after, per_case(cs, keys, "weights_after_update"), rtol=RTOL)
    # Our parameter tree flattens in jaxpi's ravel_pytree order: the norms are over the same vector.
    layout = reference()["problems"][problem]["flat_layout"]
    paths = jax.tree_util.tree_flatten_with_path(as_params(cs[0]["inputs"]["params"], arch))[0]
    assert [jax.tree_util.keystr(p) for p, _ in paths] == [e["path"] for e in layout]


def test_causal_ntk_rule_on_the_recorded_kernels(x64) -> None:
    """jaxpi's rule on its recorded (causally weighted) kernel diagonals: m_k = mean(ntk_diag[k])."""
    cs = cases("ntk", "burgers_causal_fancy")
    keys = ("ics", "res")
    default, raw = balancers("ntk", 2)
    stats = jnp.asarray([[np.mean(c["expected"]["ntk_diag"][k]) for k in keys] for c in cs])
    np.testing.assert_allclose(stats, per_case(cs, keys, "ntk_diag_mean"), rtol=1e-12)
    before = jnp.asarray(per_case(cs, keys, "weights_before_update", "inputs"))
    losses = jnp.asarray(per_case(cs, keys, "losses"))
    w_raw = jax.jit(jax.vmap(functools.partial(updated_weights, raw)))(losses, before, stats)
    w_after = jax.jit(jax.vmap(functools.partial(updated_weights, default)))(losses, before, stats)
    np.testing.assert_allclose(w_raw, per_case(cs, keys, "computed_weights_raw"), rtol=RTOL)
    np.testing.assert_allclose(w_after, per_case(cs, keys, "weights_after_update"), rtol=RTOL)


@pytest.mark.parametrize("scheme", ["grad_norm", "ntk"])
def test_update_schedule_and_momentum_chain(scheme: str) -> None:
    """The 41-step runs update at steps 0, 10, 20, 30, 40, each from the previous update's weights."""
    for problem in ("burgers_plain", "burgers_causal_fancy", "poisson1d"):
        by_step = {c["inputs"]["step"]: c for c in cases(scheme, problem)}
        for step, c in by_step.items():
            assert step % 10 == 0 and c["inputs"]["momentum"] == 0.9
            if step == 0:
                assert set(c["inputs"]["weights_before_update"].values()) == {1.0}
            if step - 10 in by_step:
                assert (
                    c["inputs"]["weights_before_update"]
                    == by_step[step - 10]["expected"]["weights_after_update"]
                )
    factory = sj.inverse_grad_norm_balancer if scheme == "grad_norm" else sj.ntk_balancer
    balancer = factory(num_losses=2, update_every=10)

    def body(state, _):
        return balancer.update(jnp.ones(2), state, jnp.ones(2))[1], state.recompute_next

    _, due = jax.lax.scan(body, balancer.init(), length=41)
    assert list(np.flatnonzero(due)) == [0, 10, 20, 30, 40]
