"""``softadapt_jax.training``: the Flax train state, train step and checkpoints under one name.

The code lives in :mod:`softadapt_jax.flax`; this module is the short import
path scripts use (``from softadapt_jax import training``) and re-exports the
same names, so that the two lists can never drift apart.
"""

from softadapt_jax import flax as _flax
from softadapt_jax.flax import *  # noqa: F403  (exactly softadapt_jax.flax.__all__)

__all__ = list(_flax.__all__)
