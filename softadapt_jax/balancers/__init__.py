"""Loss balancers: one shared state shape, one weight rule per method."""

from softadapt_jax.balancers.base import (
    Balancer,
    BalancerState,
    WeightRule,
    group_count,
    group_sum,
    make_balancer,
)
from softadapt_jax.balancers.dwa import dwa_balancer
from softadapt_jax.balancers.fixed import fixed_balancer
from softadapt_jax.balancers.gradient_weighting import (
    GradientWeightingState,
    grad_norm_balancer,
    inverse_grad_norm_balancer,
    lr_annealing_balancer,
    ntk_balancer,
)
from softadapt_jax.balancers.ratio import ratio_softadapt_balancer
from softadapt_jax.balancers.relobralo import relobralo_balancer, relobralo_init_state, relobralo_step
from softadapt_jax.balancers.rlw import rlw_balancer, rlw_draw, rlw_weights
from softadapt_jax.balancers.softadapt import softadapt_balancer
from softadapt_jax.balancers.uncertainty import (
    uncertainty_balancer,
    uncertainty_log_var_grad,
    uncertainty_weights,
)

__all__ = [
    "Balancer",
    "BalancerState",
    "GradientWeightingState",
    "WeightRule",
    "dwa_balancer",
    "fixed_balancer",
    "grad_norm_balancer",
    "group_count",
    "group_sum",
    "inverse_grad_norm_balancer",
    "lr_annealing_balancer",
    "make_balancer",
    "ntk_balancer",
    "ratio_softadapt_balancer",
    "relobralo_balancer",
    "relobralo_init_state",
    "relobralo_step",
    "rlw_balancer",
    "rlw_draw",
    "rlw_weights",
    "softadapt_balancer",
    "uncertainty_balancer",
    "uncertainty_log_var_grad",
    "uncertainty_weights",
]
