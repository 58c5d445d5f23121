"""Scheduling semantics of :func:`softadapt_jax.make_balancer`, checked against hand computations.

Every expected value here is built by hand from the documented step semantics
(``base.py``): reject non-finite losses; accumulate; every ``accumulate`` steps
push the mean as one history entry; count the step; if the window is full, the
count is a multiple of ``update_every`` and an entry was just pushed, apply the
rule. Adaptive weights are compared with :func:`softadapt_weights` of the
hand-built history.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softadapt_jax import BalancerState, make_balancer, softadapt_balancer, softadapt_weights

K = 3
# A deterministic loss stream with components of different scales and trends.
STREAM = np.array(
    [[1.0 + 0.1 * t + 0.01 * t * t, 50.0 - 2.0 * t, 3.0 * np.exp(-0.2 * t)] for t in range(24)],
    np.float32,
)


_JITTED: dict[int, tuple[object, object]] = {}


def jitted_update(balancer):
    """``jax.jit(balancer.update)``, compiled once per balancer (compilation dominates test time)."""
    key = id(balancer.update)
    if key not in _JITTED:
        _JITTED[key] = (balancer, jax.jit(balancer.update))  # keep `balancer` alive: id stays unique
    return _JITTED[key][1]


@functools.cache
def softadapt_cached(**config):
    """One balancer per configuration, shared between tests so each compiles once."""
    if "setpoint" in config:
        config["setpoint"] = np.asarray(config["setpoint"], np.float32)
    return softadapt_balancer(**config)


def run(balancer, stream, state=None):
    """Feeds ``stream`` ([steps, K]) step by step; returns per-step weights and the final state."""
    update = jitted_update(balancer)
    state = balancer.init() if state is None else state
    out = []
    for losses in stream:
        w, state = update(jnp.asarray(losses), state)
        out.append(np.asarray(w))
    return np.stack(out), state


_softadapt_weights = jax.jit(softadapt_weights, static_argnames=("variant", "sum_to_k"))


def sa_weights(history, beta=0.1, variant="loss_weighted", sum_to_k=False):
    """The reference: :func:`softadapt_weights` of a hand-built history."""
    return np.asarray(
        _softadapt_weights(jnp.asarray(history, jnp.float32), beta, variant=variant, sum_to_k=sum_to_k)
    )


def counting_rule(history, initial, method_state):
    """A rule whose method_state counts its calls; weights = normalized last entry."""
    del initial
    last = history[-1]
    return last / jnp.sum(last), method_state + 1


# ----------------------------------------------------------------------------------------------
# warm-up
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sum_to_k", [False, True])
def test_warmup_uniform_until_window_full_then_softadapt(sum_to_k):
    window = 5
    bal = softadapt_cached(num_losses=K, window=window, sum_to_k=sum_to_k)
    scale = float(K) if sum_to_k else 1.0
    chex.assert_trees_all_close(bal.init().weights, jnp.full((K,), scale / K))
    ws, _ = run(bal, STREAM[:8])
    # Steps 1..window-1: the window is not full, weights stay uniform (1/K, or 1 with sum_to_k).
    np.testing.assert_array_equal(ws[: window - 1], np.full((window - 1, K), scale / K, np.float32))
    # Step `window` onwards: SoftAdapt of the last `window` entries.
    for step in range(window, 9):
        expected = sa_weights(STREAM[step - window : step], sum_to_k=sum_to_k)
        np.testing.assert_allclose(ws[step - 1], expected, rtol=1e-6)
    # No jump: the first adaptive weights are on the warm-up scale (sum 1, or K), up to eps=1e-8.
    np.testing.assert_allclose(ws[window - 1].sum(), ws[0].sum(), rtol=1e-6)
    assert not np.allclose(ws[window - 1], ws[0])  # ...but they did adapt


def test_history_is_a_shifting_window_oldest_first():
    bal = softadapt_cached(num_losses=K, window=3)
    _, st = run(bal, STREAM[:2])
    expected = np.zeros((3, K), np.float32)
    expected[1:] = STREAM[:2]  # unfilled entries are 0, newest last
    np.testing.assert_array_equal(st.history, expected)
    assert int(st.filled) == 2 and int(st.count) == 2
    _, st = run(bal, STREAM[:7])
    np.testing.assert_array_equal(st.history, STREAM[4:7])
    assert int(st.filled) == 3 and int(st.count) == 7


# ----------------------------------------------------------------------------------------------
# update_every
# ----------------------------------------------------------------------------------------------


def test_update_every_recomputes_only_at_multiples_once_full():
    window, n = 3, 4
    bal = softadapt_cached(num_losses=K, window=window, update_every=n, variant="original")
    ws, _ = run(bal, STREAM[:16])
    uniform = np.full(K, 1.0 / K, np.float32)
    current = uniform
    for count in range(1, 17):
        # Full from count 3 on, but the first multiple of 4 is count 4.
        if count >= window and count % n == 0:
            current = sa_weights(STREAM[count - window : count], variant="original")
        np.testing.assert_allclose(ws[count - 1], current, rtol=1e-6, err_msg=f"count={count}")
    # Held between recomputations: exactly equal, and they did change at 8, 12 and 16.
    np.testing.assert_array_equal(ws[3:7], np.broadcast_to(ws[3], (4, K)))
    assert not np.array_equal(ws[7], ws[3]) and not np.array_equal(ws[11], ws[7])
    # Window full at count 3 (not a multiple of 4): still uniform.
    np.testing.assert_array_equal(ws[2], uniform)


def test_update_every_counts_rule_calls():
    bal = make_balancer(
        counting_rule, num_losses=K, window=2, weights_sum=1.0, init_method_state=jnp.int32(0), update_every=3
    )
    _, st = run(bal, STREAM[:10])
    # Full from count 2; recomputed at counts 3, 6, 9.
    assert int(st.method_state) == 3
    np.testing.assert_allclose(st.weights, STREAM[8] / STREAM[8].sum(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# accumulate
# ----------------------------------------------------------------------------------------------


def test_accumulate_history_entries_are_means_of_n_steps():
    window, n = 3, 2
    bal = softadapt_cached(num_losses=K, window=window, accumulate=n)
    stream = STREAM[:11]
    ws, st = run(bal, stream)
    means = stream[:10].reshape(5, n, K).mean(axis=1)  # entries pushed at counts 2, 4, 6, 8, 10
    np.testing.assert_allclose(st.history, means[-window:], rtol=1e-6)
    np.testing.assert_allclose(st.initial, means[0], rtol=1e-6)
    # The 11th step sits in the accumulator, not in the history.
    assert int(st.accum_count) == 1 and int(st.count) == 11 and int(st.filled) == window
    np.testing.assert_allclose(st.accum, stream[10], rtol=1e-6)
    # Uniform until the third entry (count 6); then recomputed at each push only.
    np.testing.assert_array_equal(ws[:5], np.full((5, K), 1.0 / K, np.float32))
    w6 = sa_weights(means[0:3])
    w8 = sa_weights(means[1:4])
    w10 = sa_weights(means[2:5])
    for count, expected in [(6, w6), (7, w6), (8, w8), (9, w8), (10, w10), (11, w10)]:
        np.testing.assert_allclose(ws[count - 1], expected, rtol=1e-6, err_msg=f"count={count}")


def test_accumulate_with_update_every_needs_a_push_at_a_multiple():
    # Entries at counts 2, 4, 6, 8, ...; full (window 2) at count 4; recompute needs
    # count % 4 == 0 and a push: counts 4, 8, 12.
    bal = make_balancer(
        counting_rule,
        num_losses=K,
        window=2,
        weights_sum=1.0,
        init_method_state=jnp.int32(0),
        update_every=4,
        accumulate=2,
    )
    _, st = run(bal, STREAM[:13])
    assert int(st.method_state) == 3
    last_entry = STREAM[10:12].mean(axis=0)
    np.testing.assert_allclose(st.weights, last_entry / last_entry.sum(), rtol=1e-6)


def test_initial_holds_first_pushed_entry():
    bal = softadapt_cached(num_losses=K, window=3, accumulate=3)
    st = bal.init()
    np.testing.assert_array_equal(st.initial, np.zeros(K))
    _, st = run(bal, STREAM[:2])
    np.testing.assert_array_equal(st.initial, np.zeros(K))  # nothing pushed yet
    _, st = run(bal, STREAM[:12])
    np.testing.assert_allclose(st.initial, STREAM[:3].mean(axis=0), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# robustness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_losses_only_increment_rejected(bad):
    bal = softadapt_cached(num_losses=K, window=3, accumulate=2)
    _, st = run(bal, STREAM[:7])  # window full, accumulator holding one step
    assert int(st.accum_count) == 1
    losses = jnp.array([1.0, bad, 2.0])
    update = jitted_update(bal)
    w, new = update(losses, st)
    chex.assert_trees_all_equal(new._replace(rejected=st.rejected), st)
    assert int(new.rejected) == int(st.rejected) + 1
    chex.assert_trees_all_equal(w, st.weights)
    # A later finite step continues exactly as if the bad one never happened.
    _, resumed = update(jnp.asarray(STREAM[7]), new)
    _, clean = update(jnp.asarray(STREAM[7]), st)
    chex.assert_trees_all_equal(resumed._replace(rejected=clean.rejected), clean)


def test_state_of_another_balancer_raises():
    a = softadapt_cached(num_losses=K, window=3)
    b = softadapt_cached(num_losses=K, window=5)
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(5, 3\)"):
        b.update(jnp.ones(K), a.init())


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_losses_stored_in_float32(dtype):
    bal = softadapt_cached(num_losses=K, window=2)
    half = jnp.asarray(STREAM[:3]).astype(dtype)
    update = jitted_update(bal)
    st = bal.init()
    for losses in half:
        w, st = update(losses, st)
    chex.assert_type([st.history, st.initial, st.accum, st.weights, w], jnp.float32)
    np.testing.assert_array_equal(st.history, np.asarray(half[1:].astype(jnp.float32)))
    np.testing.assert_allclose(w, sa_weights(np.asarray(half[1:].astype(jnp.float32))), rtol=1e-6)


def test_setpoint_multiplies_weights_warmup_included():
    setpoint = np.array([1.0, 10.0, 0.5], np.float32)
    plain = softadapt_cached(num_losses=K, window=3)
    prior = softadapt_cached(num_losses=K, window=3, setpoint=(1.0, 10.0, 0.5))
    chex.assert_trees_all_close(prior.init().weights, setpoint / K)
    w_plain, _ = run(plain, STREAM[:6])
    w_prior, _ = run(prior, STREAM[:6])
    np.testing.assert_allclose(w_prior, w_plain * setpoint, rtol=1e-6)
    np.testing.assert_allclose(w_prior[-1], sa_weights(STREAM[3:6]) * setpoint, rtol=1e-6)


def test_custom_rule_state_shape():
    bal = make_balancer(
        counting_rule, num_losses=2, window=3, weights_sum=2.0, init_method_state=jnp.int32(0)
    )
    st = bal.init()
    assert isinstance(st, BalancerState)
    chex.assert_shape(st.history, (3, 2))
    chex.assert_trees_all_equal(st.weights, jnp.ones(2))  # weights_sum / K
    assert bal.num_losses == 2 and bal.weights_sum == 2.0


# ----------------------------------------------------------------------------------------------
# configuration errors of SoftAdapt and make_balancer (the shared options: test_contract.py)
# ----------------------------------------------------------------------------------------------


def test_softadapt_window_1_raises():
    with pytest.raises(ValueError, match=r"`window` must be an integer >= 2, got 1\."):
        softadapt_balancer(num_losses=K, window=1)


def test_make_balancer_window_0_raises():
    with pytest.raises(ValueError, match=r"`window` must be an integer >= 1, got 0\."):
        make_balancer(counting_rule, num_losses=K, window=0, weights_sum=1.0)


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match=r"`variant` must be one of \[.*'original'.*\], got 'softmax'\."):
        softadapt_balancer(num_losses=K, variant="softmax")


def test_accuracy_order_too_large_for_window_raises():
    with pytest.raises(ValueError, match=r"`accuracy_order`=5 needs 6 time steps.*T=5"):
        softadapt_balancer(num_losses=K, window=5, accuracy_order=5)


def test_fields_of_a_batched_state_keep_the_batch_axis() -> None:
    b = softadapt_balancer(0.1, num_losses=K, window=2)
    states = jax.vmap(lambda _: b.init())(jnp.arange(5))
    assert states.weights.shape == (5, K) and states.history.shape == (5, 2, K)
    assert states.count.shape == (5,)
    bumped = states._replace(rejected=jnp.arange(5))
    np.testing.assert_array_equal(bumped.rejected, np.arange(5))
    np.testing.assert_array_equal(bumped.count, np.zeros(5))


def test_replace_unknown_field_raises() -> None:
    with pytest.raises(ValueError, match="weight"):
        softadapt_balancer(0.1, num_losses=K).init()._replace(weight=jnp.ones(K))


# ----------------------------------------------------------------------------- groups and update_first
def _mean_rule(history, initial, method_state):
    """A rule whose weights are the newest entry itself: it shows exactly what the rule saw."""
    del initial
    return history[-1], method_state


def test_groups_sum_losses_and_share_one_weight() -> None:
    groups = (0, 1, 1, 2, 1)
    b = make_balancer(_mean_rule, num_losses=5, window=1, weights_sum=3.0, groups=groups)
    assert b.groups == groups and b.num_losses == 5
    state = b.init()
    assert state.history.shape == (1, 3) and state.weights.shape == (5,)
    np.testing.assert_allclose(state.weights, np.ones(5))  # uniform on the groups' scale: 3 / 3
    losses = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    weights, state = b.update(losses, state)
    np.testing.assert_allclose(state.history[-1], [1.0, 10.0, 4.0])
    np.testing.assert_allclose(weights, [1.0, 10.0, 10.0, 4.0, 10.0])


def test_groups_setpoint_is_per_term_and_nonfinite_term_rejects_the_step() -> None:
    b = make_balancer(
        _mean_rule, num_losses=3, window=1, weights_sum=2.0, groups=[1, 0, 1], setpoint=[1.0, 2.0, 3.0]
    )
    weights, state = b.update(jnp.array([1.0, 2.0, 3.0]), b.init())
    np.testing.assert_allclose(weights, [4.0 * 1.0, 2.0 * 2.0, 4.0 * 3.0])
    _, state2 = b.update(jnp.array([1.0, jnp.inf, 3.0]), state)
    assert int(state2.rejected) == 1
    np.testing.assert_array_equal(state2.weights, state.weights)


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        ((0, 1), ValueError, r"one group id per loss term \(length num_losses=3\), got length 2"),
        ((0, 2, 2), ValueError, r"each of the ids 0..G-1.*got ids \[0, 2\]"),
        ((0, 1.5, 1), TypeError, r"`groups` must hold ints"),
        (jnp.array([0, 1, 1]), TypeError, r"`groups` is static configuration"),
        (3, TypeError, r"`groups` must be a sequence of 3 ints"),
    ],
)
def test_groups_errors_name_the_argument(groups, error, match) -> None:
    with pytest.raises(error, match=match):
        make_balancer(_mean_rule, num_losses=3, window=1, weights_sum=1.0, groups=groups)


def test_group_helpers() -> None:
    from softadapt_jax.balancers.base import expand_groups, group_count, group_sum

    assert group_count(4, None) == 4 and group_count(4, [0, 0, 1, 0]) == 2
    x = jnp.arange(8.0).reshape(4, 2)
    np.testing.assert_allclose(group_sum(x, (0, 0, 1, 0)), [[0 + 2 + 6, 1 + 3 + 7], [4, 5]])
    np.testing.assert_allclose(expand_groups(jnp.array([7.0, 9.0]), (1, 0, 1)), [9.0, 7.0, 9.0])
    assert group_sum(x, None) is x


@pytest.mark.parametrize(("update_first", "expected_steps"), [(False, [2, 5, 8]), (True, [0, 3, 6, 9])])
def test_update_first_moves_the_recompute_steps(update_first, expected_steps) -> None:
    calls = []

    def counting_rule(history, initial, method_state):
        return history[-1], method_state + 1

    b = make_balancer(
        counting_rule,
        num_losses=2,
        window=1,
        weights_sum=2.0,
        init_method_state=jnp.int32(0),
        update_every=3,
        update_first=update_first,
    )
    state = b.init()
    for step in range(10):
        due = bool(state.recompute_next)
        before = int(state.method_state)
        _, state = b.update(jnp.array([1.0, 2.0]), state)
        assert (int(state.method_state) == before + 1) == due
        if due:
            calls.append(step)
    assert calls == expected_steps
