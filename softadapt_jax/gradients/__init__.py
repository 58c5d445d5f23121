"""Gradient-level balancing: per-component gradients, their Gramian, PCGrad, MGDA, CAGrad, GradNorm.

Unlike the loss-statistics balancers, these methods look at the K gradients
themselves, so they need K backward passes (batched into one with ``vmap``)
and K x P memory, or the Gramian-only route described in
:mod:`softadapt_jax.gradients.per_component`.
"""

from softadapt_jax.gradients.aggregators import Aggregator, aggregate, aggregator
from softadapt_jax.gradients.combiners import (
    CAGRAD_RESCALES,
    CONVENTIONS,
    MGDA_COMBINES,
    MGDA_CONVENTIONS,
    MGDA_NORMALIZATIONS,
    PCGradState,
    cagrad,
    cagrad_coefficients,
    cagrad_dual_problem,
    cagrad_weights,
    mgda,
    mgda_normalizers,
    mgda_weights,
    normalize_gramian,
    pcgrad,
    pcgrad_weights,
)
from softadapt_jax.gradients.gradnorm import (
    GRADNORM_CONVENTIONS,
    GradNormInfo,
    GradNormState,
    component_norms,
    gradnorm,
    gradnorm_init,
    gradnorm_targets,
    gradnorm_weights,
    layer_grad_norms,
)
from softadapt_jax.gradients.per_component import (
    GRAMIAN_METHODS,
    gramian,
    per_component_grads,
    resolve_mask,
    stacked_gramian,
)
from softadapt_jax.gradients.resnorm import (
    ResNormInfo,
    ResNormState,
    resnorm,
    resnorm_init,
    resnorm_step,
    resnorm_targets,
    resnorm_weights,
)

__all__ = [
    "CAGRAD_RESCALES",
    "CONVENTIONS",
    "GRADNORM_CONVENTIONS",
    "GRAMIAN_METHODS",
    "MGDA_COMBINES",
    "MGDA_CONVENTIONS",
    "MGDA_NORMALIZATIONS",
    "Aggregator",
    "GradNormInfo",
    "GradNormState",
    "PCGradState",
    "ResNormInfo",
    "ResNormState",
    "aggregate",
    "aggregator",
    "cagrad",
    "cagrad_coefficients",
    "cagrad_dual_problem",
    "cagrad_weights",
    "component_norms",
    "gradnorm",
    "gradnorm_init",
    "gradnorm_targets",
    "gradnorm_weights",
    "gramian",
    "layer_grad_norms",
    "mgda",
    "mgda_normalizers",
    "mgda_weights",
    "normalize_gramian",
    "pcgrad",
    "pcgrad_weights",
    "per_component_grads",
    "resnorm",
    "resnorm_init",
    "resnorm_step",
    "resnorm_targets",
    "resnorm_weights",
    "resolve_mask",
    "stacked_gramian",
]
