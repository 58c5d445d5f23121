"""Loss balancers: one shared state shape, one weight rule per method."""

from softadapt_jax.balancers.base import Balancer, BalancerState, WeightRule, make_balancer
from softadapt_jax.balancers.gradient_weighting import (
    GradientWeightingState,
    grad_norm_balancer,
    lr_annealing_balancer,
    ntk_balancer,
)
from softadapt_jax.balancers.softadapt import softadapt_balancer

__all__ = [
    "Balancer",
    "BalancerState",
    "GradientWeightingState",
    "WeightRule",
    "grad_norm_balancer",
    "lr_annealing_balancer",
    "make_balancer",
    "ntk_balancer",
    "softadapt_balancer",
]
