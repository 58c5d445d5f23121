"""Random weighting: softmax of standard-normal draws (torchjd's ``Random``)."""

from __future__ import annotations

from typing import Any

import jax

from softadapt_jax.gradients.aggregators._core import (
    Aggregator,
    check_jacobian,
    check_key,
    combine_rows,
    no_state,
)


def random_weights(draws: jax.Array) -> jax.Array:
    """``softmax(draws)``: positive weights summing to 1 from K standard-normal draws.

    Paper: Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning" (TMLR 2022), Algorithm 2. Original
    implementation reproduced: torchjd 0.18.0, ``torchjd/aggregation/_random.py``
    (``RandomWeighting``: ``softmax(torch.randn(K))``); the draws are an
    argument so that torchjd's recorded ``randn`` can be replayed.

    Args:
      draws: ``[K]`` standard-normal draws.

    Returns:
      ``[K]`` weights.
    """
    return jax.nn.softmax(draws)


def random() -> Aggregator:
    """torchjd's ``Random()``: ``d = softmax(z) @ J`` with ``z ~ N(0, I_K)`` drawn from ``key`` at each call.

    ``update`` needs ``key`` (``jax.random.normal(key, (K,))`` gives the
    draws). The aggregator has no Gramian ``weighting`` (its weights do not
    depend on the Gramian but on the key), so the optax adapter takes the
    Jacobian route and splits its key at every step.

    Returns:
      A stateless :class:`Aggregator` named ``"random"`` with ``needs_key=True``.
    """

    def update(jacobian: Any, state: Any, *, losses: Any = None, key: Any = None) -> tuple[jax.Array, Any]:
        del losses
        j = check_jacobian(jacobian)
        key = check_key(key, "random")
        w = random_weights(jax.random.normal(key, (j.shape[0],), j.dtype))
        return combine_rows(w, j), state

    return Aggregator(name="random", init=no_state, update=update, needs_key=True)


AGGREGATORS = {"random": random}
