"""softadapt_jax: adaptive loss balancing for JAX, optax and Flax.

Public names are re-exported here; see README.md for a tour.
"""

from softadapt_jax.slopes import finite_difference_coefficients, rates_of_change
from softadapt_jax.weights import SoftAdaptOptions, softadapt_weights, stable_softmax

__version__ = "0.1.0"

__all__ = [
    "SoftAdaptOptions",
    "finite_difference_coefficients",
    "rates_of_change",
    "softadapt_weights",
    "stable_softmax",
]
