"""``softadapt_jax.training``: the Flax train state, train step and checkpoints under one name.

The code lives in :mod:`softadapt_jax.flax`; this module is the short import
path scripts use (``from softadapt_jax import training``).
"""

from softadapt_jax.flax.checkpoints import CheckpointError, restore_checkpoint, save_checkpoint
from softadapt_jax.flax.train_state import BalancedTrainState
from softadapt_jax.flax.train_step import (
    LossComponentsFn,
    Metrics,
    data_mesh,
    data_shardings,
    make_pmap_train_step,
    make_train_step,
    replicate,
    shard_batch,
    unreplicate,
)

__all__ = [
    "BalancedTrainState",
    "CheckpointError",
    "LossComponentsFn",
    "Metrics",
    "data_mesh",
    "data_shardings",
    "make_pmap_train_step",
    "make_train_step",
    "replicate",
    "restore_checkpoint",
    "save_checkpoint",
    "shard_batch",
    "unreplicate",
]
