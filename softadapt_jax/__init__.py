"""softadapt_jax: adaptive loss balancing for JAX, optax and Flax.

Public names are re-exported here; see README.md for a tour.
"""

from softadapt_jax.balancers import (
    Balancer,
    BalancerState,
    WeightRule,
    dwa_balancer,
    fixed_balancer,
    grad_norm_balancer,
    lr_annealing_balancer,
    make_balancer,
    ntk_balancer,
    ratio_softadapt_balancer,
    relobralo_balancer,
    rlw_balancer,
    softadapt_balancer,
    uncertainty_balancer,
)
from softadapt_jax.slopes import finite_difference_coefficients, rates_of_change
from softadapt_jax.statistics import compute_statistic
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
    "compute_statistic",
    "dwa_balancer",
    "find_balancer_states",
    "finite_difference_coefficients",
    "fixed_balancer",
    "get_weights",
    "grad_norm_balancer",
    "lr_annealing_balancer",
    "make_balancer",
    "ntk_balancer",
    "rates_of_change",
    "ratio_softadapt_balancer",
    "relobralo_balancer",
    "rlw_balancer",
    "softadapt",
    "softadapt_balancer",
    "softadapt_weights",
    "stable_softmax",
    "uncertainty_balancer",
    "value_and_weighted_grad",
]
