"""softadapt_jax: adaptive loss balancing for JAX, optax and Flax.

Public names are re-exported here; see README.md for a tour.
"""

# Modules reachable as attributes (``sj.training``, ``sj.flax``, ...) like ``sj.gradients``; ``flax`` is
# left out of __all__ so that a star import never shadows the flax package.
from softadapt_jax import causal, flax, guard, self_adaptive, training  # noqa: F401 (flax)
from softadapt_jax.balancers import (
    Balancer,
    BalancerState,
    WeightRule,
    dwa_balancer,
    fixed_balancer,
    grad_norm_balancer,
    inverse_grad_norm_balancer,
    lr_annealing_balancer,
    make_balancer,
    ntk_balancer,
    ratio_softadapt_balancer,
    relobralo_balancer,
    rlw_balancer,
    softadapt_balancer,
    uncertainty_balancer,
)
from softadapt_jax.flax import checkpoints, rotograd
from softadapt_jax.flax.rotograd import (
    RotateOnly,
    RotoGrad,
    RotoGradNorm,
    RotoGradStats,
    RotoGradTrainState,
    create_rotograd_train_state,
    make_rotograd_pmap_train_step,
    make_rotograd_train_step,
    rotograd_gradients,
    rotograd_optimizer,
)
from softadapt_jax.gradients import (
    GradNormState,
    PCGradState,
    cagrad,
    cagrad_weights,
    gradnorm,
    gradnorm_weights,
    gramian,
    layer_grad_norms,
    mgda,
    mgda_weights,
    pcgrad,
    pcgrad_weights,
    per_component_grads,
    stacked_gramian,
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
    "GradNormState",
    "PCGradState",
    "RotateOnly",
    "RotoGrad",
    "RotoGradNorm",
    "RotoGradStats",
    "RotoGradTrainState",
    "SoftAdaptOptions",
    "WeightRule",
    "balance",
    "cagrad",
    "cagrad_weights",
    "causal",
    "checkpoints",
    "compute_statistic",
    "create_rotograd_train_state",
    "dwa_balancer",
    "find_balancer_states",
    "finite_difference_coefficients",
    "fixed_balancer",
    "get_weights",
    "grad_norm_balancer",
    "gradnorm",
    "gradnorm_weights",
    "gramian",
    "guard",
    "inverse_grad_norm_balancer",
    "layer_grad_norms",
    "lr_annealing_balancer",
    "make_balancer",
    "make_rotograd_pmap_train_step",
    "make_rotograd_train_step",
    "mgda",
    "mgda_weights",
    "ntk_balancer",
    "pcgrad",
    "pcgrad_weights",
    "per_component_grads",
    "rates_of_change",
    "ratio_softadapt_balancer",
    "relobralo_balancer",
    "rlw_balancer",
    "rotograd",
    "rotograd_gradients",
    "rotograd_optimizer",
    "self_adaptive",
    "softadapt",
    "softadapt_balancer",
    "softadapt_weights",
    "stable_softmax",
    "stacked_gramian",
    "training",
    "uncertainty_balancer",
    "value_and_weighted_grad",
]
