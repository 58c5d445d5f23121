"""Loss-statistics balancers: one shared state shape, one weight rule per method."""

from softadapt_jax.balancers.base import Balancer, BalancerState, WeightRule, make_balancer
from softadapt_jax.balancers.softadapt import softadapt_balancer

__all__ = ["Balancer", "BalancerState", "WeightRule", "make_balancer", "softadapt_balancer"]
