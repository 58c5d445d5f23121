"""Hand computations (NumPy) of every comparison balancer, and their per-method guarantees.

Each method's formula is re-implemented in NumPy float64 and driven by a NumPy
copy of the shared scheduling of ``make_balancer`` (history window, ``accumulate``,
``update_every``, warm-up, set-point). PRNG-driven methods replay the same
``jax.random`` calls on the same raw keys to get the same draws. The properties
every balancer shares (scale, set-point, non-finite losses, shared option checks)
are in ``test_contract.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softadapt_jax.balancers.base import Balancer, safe_ratio
from softadapt_jax.balancers.dwa import dwa_balancer
from softadapt_jax.balancers.fixed import fixed_balancer
from softadapt_jax.balancers.ratio import ratio_softadapt_balancer
from softadapt_jax.balancers.relobralo import relobralo_balancer
from softadapt_jax.balancers.rlw import rlw_balancer
from softadapt_jax.balancers.uncertainty import uncertainty_balancer

K = 3
TOL = {"rtol": 2e-5, "atol": 1e-6}
_rng = np.random.default_rng(1234)
# 9 steps of 3 positive losses on different scales, mostly decreasing, with noise.
LOSSES = (
    np.array([1.0, 10.0, 0.1])
    * np.exp(-0.15 * np.arange(9)[:, None] * np.array([1.0, 0.3, 2.0]))
    * np.exp(0.2 * _rng.normal(size=(9, K)))
)
SETPOINT = (2.0, 0.5, 1.0)
SGD_LR = 0.3
SGD = optax.sgd(SGD_LR)  # one object, so balancers using it hit the compilation cache

FACTORIES: dict[str, Callable[..., Balancer]] = {
    "fixed": fixed_balancer,
    "ratio": ratio_softadapt_balancer,
    "relobralo": relobralo_balancer,
    "dwa": dwa_balancer,
    "uncertainty": uncertainty_balancer,
    "rlw": rlw_balancer,
}


@functools.cache
def make(name: str, **kwargs: Any) -> Balancer:
    """One balancer object per configuration, so jitted runs are compiled once per module."""
    if "setpoint" in kwargs and kwargs["setpoint"] is not None:
        kwargs["setpoint"] = np.asarray(kwargs["setpoint"])
    return FACTORIES[name](num_losses=K, **kwargs)


# Every run feeds the same two streams' shape ``[2, 9, K]``: ``jax.vmap`` of a
# ``lax.scan`` under ``jax.jit``, so each balancer is compiled once, and each
# hand computation below checks both streams of the batch (jit/vmap agreement
# with per-stream NumPy runs).
OTHER = np.sqrt(LOSSES[::-1]) * 2.0
STREAMS = (LOSSES, OTHER)


@functools.partial(jax.jit, static_argnums=0)
def _run(balancer: Balancer, losses: jax.Array) -> tuple[jax.Array, Any]:
    def one(stream: jax.Array) -> tuple[jax.Array, Any]:
        def body(state: Any, loss: jax.Array) -> tuple[Any, tuple[jax.Array, Any]]:
            w, state = balancer.update(loss, state)
            return state, (w, state)

        _, (ws, states) = jax.lax.scan(body, balancer.init(), stream)
        return ws, states

    return jax.vmap(one)(losses)


def run(balancer: Balancer, first: np.ndarray = LOSSES, second: np.ndarray = OTHER) -> tuple[np.ndarray, Any]:
    """Weights ``[2, T, K]`` and states (NumPy, stacked ``[2, T, ...]``) after each step of two streams."""
    ws, states = _run(balancer, jnp.asarray(np.stack([first, second]), jnp.float32))
    return np.asarray(ws), jax.tree.map(np.asarray, states)


def final(states: Any, i: int = 0) -> Any:
    """The state of stream ``i`` after its last step."""
    return jax.tree.map(lambda x: x[i, -1], states)


def ref_schedule(
    rule: Callable[[np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]],
    losses: np.ndarray,
    *,
    window: int,
    weights_sum: float,
    method_state: Any = None,
    accumulate: int = 1,
    update_every: int = 1,
    setpoint: Any = None,
) -> tuple[np.ndarray, Any]:
    """NumPy copy of make_balancer's scheduling: the weights after each step."""
    num = losses.shape[1]
    sp = np.ones(num) if setpoint is None else np.asarray(setpoint, float)
    entries: list[np.ndarray] = []
    acc, n_acc, count = np.zeros(num), 0, 0
    w = np.full(num, weights_sum / num) * sp
    out = []
    for loss in losses:
        acc, n_acc = acc + loss, n_acc + 1
        pushed = n_acc == accumulate
        if pushed:
            entries.append(acc / n_acc)
            acc, n_acc = np.zeros(num), 0
        count += 1
        if pushed and len(entries) >= window and count % update_every == 0:
            w_raw, method_state = rule(np.array(entries[-window:]), entries[0], method_state)
            w = np.asarray(w_raw, float) * sp
        out.append(w.copy())
    return np.array(out), method_state


def np_softmax_k(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return len(x) * e / e.sum()


def split(key: Any) -> tuple[Any, Any]:
    key, sub = jax.random.split(key)
    return key, sub


def check_hand(
    b: Balancer, rule: Callable[..., Any], method_state: Any = None, *, window: int, **cfg: Any
) -> tuple[list[Any], np.ndarray, Any]:
    """Runs ``b`` on both streams and compares with the NumPy schedule of ``rule``.

    ``cfg`` is the balancer's configuration; its ``accumulate``, ``update_every``
    and ``setpoint`` drive the reference schedule (the set-point multiplies the
    hand-computed weights). Returns the reference's final ``method_state`` per
    stream, and the balancer's weights and states.
    """
    sched = {key: cfg[key] for key in ("accumulate", "update_every", "setpoint") if key in cfg}
    ws, states = run(b)
    out = []
    for i, stream in enumerate(STREAMS):
        want, ms = ref_schedule(
            rule, stream, window=window, weights_sum=b.weights_sum, method_state=method_state, **sched
        )
        np.testing.assert_allclose(ws[i], want, **TOL)
        out.append(ms)
    return out, ws, states


def raw(ws: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """The weights before the set-point."""
    return ws / np.asarray(cfg.get("setpoint", np.ones(K)))


# --------------------------------------------------------------------------- fixed


@pytest.mark.parametrize("cfg", [{}, {"weights": (1.0, 2.0, 0.25), "setpoint": SETPOINT}])
def test_fixed_hand(cfg):
    b = make("fixed", **cfg)
    w = np.array(cfg.get("weights", np.ones(K)))
    sp = np.array(cfg.get("setpoint", np.ones(K)))
    assert b.weights_sum == pytest.approx(w.sum())
    np.testing.assert_allclose(b.init().weights, w * sp, **TOL)
    ws, _ = run(b)
    np.testing.assert_allclose(ws, np.broadcast_to(w * sp, ws.shape), **TOL)


# --------------------------------------------------------------------------- ratio (Modulus)


@pytest.mark.parametrize("cfg", [{}, {"accumulate": 2, "update_every": 3, "setpoint": SETPOINT}])
def test_ratio_softadapt_hand(cfg):
    def rule(h, initial, ms):
        return np_softmax_k(h[-1] / (h[-2] + 1e-8)), ms

    _, ws, _ = check_hand(make("ratio", **cfg), rule, window=2, **cfg)
    np.testing.assert_allclose(raw(ws, cfg).sum(axis=-1), K, rtol=1e-5)
    if not cfg:  # explicit first adaptive step: the newest entry over the one before
        np.testing.assert_allclose(ws[0, 0], np.ones(K))
        np.testing.assert_allclose(ws[0, 1], np_softmax_k(LOSSES[1] / LOSSES[0]), **TOL)


def test_ratio_softadapt_zero_previous_loss_is_finite():
    losses = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 2.0], [0.0, 0.0, 1.0]])
    ws, _ = run(make("ratio"), np.concatenate([losses, np.ones((6, K))]))
    assert np.all(np.isfinite(ws))
    np.testing.assert_allclose(ws.sum(axis=-1), K, rtol=1e-6)
    # L(t-1) = 0 < L(t): ratio L(t) / eps, that loss takes all the weight.
    np.testing.assert_allclose(ws[0, 1], [K, 0.0, 0.0], atol=1e-6)
    # With eps = 0: x / 0 is +-inf (clipped by the softmax), 0 / 0 is 1 (no change).
    r = np.asarray(safe_ratio(jnp.array([0.0, 2.0, -2.0, 3.0]), jnp.array([0.0, 0.0, 0.0, 2.0]), 0.0))
    np.testing.assert_array_equal(r, [1.0, np.inf, -np.inf, 1.5])


# --------------------------------------------------------------------------- ReLoBRaLo


@pytest.mark.parametrize(
    "cfg",
    [
        {"expected_rho": 0.5, "seed": 3},
        {"alpha": 0.9, "tau": 1.0, "expected_rho": 0.5, "seed": 1, "update_every": 2, "setpoint": SETPOINT},
        {"convention": "physicsnemo", "tau": 0.5, "expected_rho": 0.5, "seed": 2},
    ],
    ids=["bischof", "bischof-every2-setpoint", "physicsnemo"],
)
def test_relobralo_hand(cfg):
    physicsnemo = cfg.get("convention") == "physicsnemo"
    alpha = cfg.get("alpha", 0.95 if physicsnemo else 0.999)
    tau, p = cfg.get("tau", 1.0), cfg.get("expected_rho", 0.99 if physicsnemo else 1.0)
    eps = 1e-8 if physicsnemo else 1e-12
    rhos = []

    def bal(cur, ref):
        r = cur / (tau * ref + eps)
        e = np.exp(r - r.max())
        return K * e / (e.sum() + (eps if physicsnemo else 0.0))

    def rule(h, initial, ms):
        key, lam, prev, ref, calls = ms
        key, sub = split(key)
        rho = float(jax.random.bernoulli(sub, p))
        rhos.append(rho)
        cur = h[-1]
        if physicsnemo and calls == 0:  # records the losses, keeps lambda = 1
            return lam, (key, lam, cur, cur, 1)
        # The authors' schedule: alpha = 1 at the first call, 0 at the second.
        a = alpha if physicsnemo or calls > 1 else float(calls == 0)
        lam = rho * a * lam + (1 - rho) * a * bal(cur, ref) + (1 - a) * bal(cur, prev)
        ref = cur if (not physicsnemo and calls == 1) else ref  # the authors' l0: the second call's losses
        return lam, (key, lam, cur, ref, calls + 1)

    ms0 = (jax.random.PRNGKey(cfg.get("seed", 0)), np.ones(K), np.ones(K), np.ones(K), 0)
    ((key, lam, _, ref, _), _), ws, states = check_hand(make("relobralo", **cfg), rule, ms0, window=1, **cfg)
    assert set(rhos) == {0.0, 1.0}  # the seeds are chosen so that both branches of rho occur
    np.testing.assert_allclose(raw(ws, cfg).sum(axis=-1), K, rtol=1e-5)
    state = final(states)
    np.testing.assert_array_equal(state.method_state["key"], key)
    assert state.method_state["key"].dtype == np.uint32
    np.testing.assert_allclose(state.method_state["lambdas"], lam, **TOL)  # before the set-point
    np.testing.assert_allclose(state.method_state["ref"], ref, rtol=1e-6)  # the lookback reference


# --------------------------------------------------------------------------- DWA


@pytest.mark.parametrize(
    "cfg", [{}, {"temperature": 0.5, "average_over": 2, "update_every": 3, "setpoint": SETPOINT}]
)
def test_dwa_hand(cfg):
    temp, n = cfg.get("temperature", 2.0), cfg.get("average_over", 1)

    def rule(h, initial, ms):
        recent, older = h[-n:].mean(axis=0), h[-2 * n : -n].mean(axis=0)
        return np_softmax_k(recent / (older + 1e-8) / temp), ms

    _, ws, _ = check_hand(make("dwa", **cfg), rule, window=2 * n, **cfg)
    np.testing.assert_allclose(raw(ws, cfg).sum(axis=-1), K, rtol=1e-5)
    if not cfg:  # paper's indexing: weights for step t from L(t-1) / L(t-2), no extra lag
        np.testing.assert_allclose(ws[0, 0], np.ones(K))
        np.testing.assert_allclose(ws[0, 4], np_softmax_k(LOSSES[4] / LOSSES[3] / 2.0), **TOL)


def test_dwa_accumulate_is_the_papers_epoch_average():
    steps_per_epoch = 3
    ws, _ = run(make("dwa", accumulate=steps_per_epoch))
    ws = ws[0]
    epoch_means = LOSSES.reshape(3, steps_per_epoch, K).mean(axis=1)
    # Epochs 0 and 1 use ones (w(1) = w(2) = 1 in the paper); the weights change only
    # at the end of an epoch, from the ratio of the last two epoch means.
    np.testing.assert_allclose(ws[: 2 * steps_per_epoch - 1], 1.0)
    np.testing.assert_allclose(ws[5], np_softmax_k(epoch_means[1] / epoch_means[0] / 2.0), **TOL)
    np.testing.assert_allclose(ws[6:8], np.broadcast_to(ws[5], (2, K)))
    np.testing.assert_allclose(ws[8], np_softmax_k(epoch_means[2] / epoch_means[1] / 2.0), **TOL)


# --------------------------------------------------------------------------- uncertainty

UNCERTAINTY_AB = {"simple": (1.0, 1.0), "regression": (0.5, 0.5), "classification": (1.0, 0.5)}
# With lr 2 the classification form's update is a Newton step at its stationary point.
NEWTON_LR = 2.0
NEWTON = optax.sgd(NEWTON_LR)


@pytest.mark.parametrize(
    "cfg,lr",
    [
        ({"form": "regression", "optimizer": SGD, "setpoint": SETPOINT}, SGD_LR),
        ({"form": "classification", "optimizer": NEWTON}, NEWTON_LR),
    ],
    ids=["regression-setpoint", "classification"],
)
def test_uncertainty_hand_sgd(cfg, lr):
    b = make("uncertainty", **cfg)
    a, c = UNCERTAINTY_AB[cfg["form"]]

    def rule(h, initial, s):
        s = s - lr * (c - a * np.exp(-s) * h[-1])
        return a * np.exp(-s), s

    s0 = -0.5  # the default convention's ("libmtl") initial log-variance
    assert b.weights_sum == pytest.approx(a * K * np.exp(-s0))
    np.testing.assert_allclose(raw(b.init().weights, cfg), np.full(K, a * np.exp(-s0)), rtol=1e-6)
    (s, _), _, states = check_hand(b, rule, np.full(K, s0), window=1, **cfg)
    np.testing.assert_allclose(final(states).method_state["log_vars"], s, **TOL)


def test_uncertainty_hand_physicsnemo_adam():
    """convention="physicsnemo": form "regression" (a = b = 1/2), s0 = 0, optax.adam(1e-2) written out."""
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8

    def rule(h, initial, ms):
        s, m, v, t = ms
        g = 0.5 - 0.5 * np.exp(-s) * h[-1]
        t += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        s = s - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        return 0.5 * np.exp(-s), (s, m, v, t)

    zeros = np.zeros(K)
    check_hand(make("uncertainty", convention="physicsnemo"), rule, (zeros, zeros, zeros, 0), window=1)


def test_uncertainty_converges_to_theory():
    # Checks the sign conventions against theory, not against our own formula:
    # the stationary point of exp(-s) L + s / 2 is w = exp(-s) = 1 / (2 L).
    const = np.array([0.25, 1.0, 4.0])
    b = make("uncertainty", form="classification", optimizer=NEWTON, init_log_var=0.0)
    ws, _ = run(b, *[np.tile(const, (9, 1))] * 2)
    np.testing.assert_allclose(ws[0, -1], 0.5 / const, rtol=1e-3)


def test_uncertainty_zero_loss_is_clipped():
    # A zero loss drives s down forever; it is clipped so that the weight stays finite.
    ws, states = run(make("uncertainty", optimizer=optax.sgd(10.0)), np.zeros((9, K)))
    assert np.all(np.isfinite(ws)) and np.all(ws > 0)
    bound = 0.5 * np.log(np.finfo(np.float32).max)
    np.testing.assert_allclose(final(states).method_state["log_vars"], -bound, rtol=1e-6)


# --------------------------------------------------------------------------- RLW


@pytest.mark.parametrize(
    "cfg",
    [
        {"seed": 5, "update_every": 2},
        {"distribution": "uniform", "seed": 5, "setpoint": SETPOINT},
        {"distribution": "dirichlet"},
    ],
    ids=["normal", "uniform-setpoint", "dirichlet"],
)
def test_rlw_hand(cfg):
    distribution = cfg.get("distribution", "normal")

    def rule(h, initial, key):
        key, sub = split(key)
        if distribution == "normal":
            w = np_softmax_k(np.asarray(jax.random.normal(sub, (K,), jnp.float32), float)) / K
        elif distribution == "uniform":
            w = np_softmax_k(np.asarray(jax.random.uniform(sub, (K,), jnp.float32), float)) / K
        else:  # Dirichlet(1, ..., 1) as normalised Exp(1) draws
            e = np.asarray(jax.random.exponential(sub, (K,), jnp.float32), float)
            w = e / e.sum()
        return w, key

    # init() makes the first draw (the weights of step 0, held until the first redraw);
    # the updates continue the key chain.
    w0, key0 = rule(None, None, jax.random.PRNGKey(cfg.get("seed", 0)))
    b = make("rlw", **cfg)
    sp = np.asarray(cfg.get("setpoint", np.ones(K)))
    np.testing.assert_allclose(b.init().weights, w0 * sp, **TOL)
    ws, states = run(b)
    sched = {name: cfg[name] for name in ("update_every", "setpoint") if name in cfg}
    want, key = ref_schedule(rule, LOSSES, window=1, weights_sum=1.0, method_state=key0, **sched)
    want[: cfg.get("update_every", 1) - 1] = w0 * sp
    np.testing.assert_allclose(ws, np.broadcast_to(want, ws.shape), **TOL)
    np.testing.assert_allclose(raw(ws, cfg).sum(axis=-1), 1.0, rtol=1e-5)
    assert np.all(ws >= 0)
    np.testing.assert_array_equal(final(states).method_state["key"], key)
    # The draws ignore the losses (both streams get the same weights) and differ at each redraw.
    np.testing.assert_array_equal(ws[0], ws[1])
    assert not np.allclose(ws[0, 1], ws[0, 3])
    if cfg.get("update_every") == 2:  # held between redraws
        np.testing.assert_array_equal(ws[0, 1], ws[0, 2])


# --------------------------------------------------------------------------- validation

# (factory, kwargs, exception, message regex) for every error the docstrings promise.
ERRORS = [
    ("fixed", {"weights": (1.0, 2.0)}, ValueError, r"`weights` must have shape \(3,\).*got \(2,\)"),
    ("fixed", {"weights": (1.0, -2.0, 1.0)}, ValueError, r"`weights` must be finite and >= 0"),
    ("fixed", {"weights": (1.0, np.nan, 1.0)}, ValueError, r"`weights` must be finite and >= 0"),
    ("ratio", {"eps": -1.0}, ValueError, r"`eps` must be a finite number >= 0, got -1.0"),
    ("relobralo", {"alpha": 1.5}, ValueError, r"`alpha` must be a finite number in \[0, 1\], got 1.5"),
    ("relobralo", {"tau": 0.0}, ValueError, r"`tau` must be a finite number > 0, got 0.0"),
    ("relobralo", {"expected_rho": -0.1}, ValueError, r"`expected_rho` must be .* in \[0, 1\], got -0.1"),
    ("relobralo", {"eps": float("nan")}, ValueError, r"`eps` must be a finite number >= 0, got nan"),
    ("relobralo", {"seed": -1}, ValueError, r"`seed` must be an integer >= 0, got -1"),
    ("relobralo", {"alpha": "high"}, TypeError, r"`alpha` must be a real number"),
    ("dwa", {"temperature": 0.0}, ValueError, r"`temperature` must be a finite number > 0, got 0.0"),
    ("dwa", {"temperature": -2.0}, ValueError, r"`temperature` must be a finite number > 0, got -2.0"),
    ("dwa", {"average_over": 0}, ValueError, r"`average_over` must be an integer >= 1, got 0"),
    ("dwa", {"eps": -1e-3}, ValueError, r"`eps` must be a finite number >= 0, got -0.001"),
    ("uncertainty", {"form": "gaussian"}, ValueError, r"`form` must be one of .*'simple'.*got 'gaussian'"),
    ("uncertainty", {"optimizer": "adam"}, TypeError, r"`optimizer` must be an optax.GradientTransformation"),
    ("rlw", {"distribution": "beta"}, ValueError, r"`distribution` must be one of .*got 'beta'"),
    ("rlw", {"seed": -3}, ValueError, r"`seed` must be an integer >= 0, got -3"),
]


@pytest.mark.parametrize("name,kwargs,exc,match", ERRORS)
def test_factory_errors(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FACTORIES[name](num_losses=K, **kwargs)


def test_fixed_rejects_traced_weights():
    with pytest.raises(TypeError, match="must be concrete"):
        jax.jit(lambda w: fixed_balancer(w, num_losses=K).init().weights)(jnp.ones(K))
