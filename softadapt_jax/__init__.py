"""softadapt_jax: adaptive loss balancing for JAX, optax and Flax.

Public names are re-exported here; see README.md for a tour.
"""

from softadapt_jax.balancers import (
    Balancer,
    BalancerState,
    WeightRule,
    make_balancer,
    softadapt_balancer,
)
from softadapt_jax.slopes import finite_difference_coefficients, rates_of_change
from softadapt_jax.transform import (
    SOFTADAPT_STATIC_ARGS,
    balance,
    find_balancer_states,
    get_weights,
    softadapt,
    value_and_weighted_grad,
)
from softadapt_jax.weights import SoftAdaptOptions, softadapt_weights, stable_softmax

__version__ = "0.1.0"

__all__ = [
    "SOFTADAPT_STATIC_ARGS",
    "Balancer",
    "BalancerState",
    "SoftAdaptOptions",
    "WeightRule",
    "balance",
    "find_balancer_states",
    "finite_difference_coefficients",
    "get_weights",
    "make_balancer",
    "rates_of_change",
    "softadapt",
    "softadapt_balancer",
    "softadapt_weights",
    "stable_softmax",
    "value_and_weighted_grad",
]
