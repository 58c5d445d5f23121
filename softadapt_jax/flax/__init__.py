"""The Flax layer: train state, the one pure train step, NNX, RotoGrad and checkpoints.

Nothing below this package imports Flax; the core (weights, balancers,
transforms, gradients, statistics) works with plain optax.

* :mod:`~softadapt_jax.flax.train_state`: :class:`BalancedTrainState`, whose
  ``apply_gradients`` passes ``losses`` to ``tx.update`` (Flax's own drops them);
* :mod:`~softadapt_jax.flax.train_step`: :func:`make_train_step` and the
  helpers of its ``pmap`` / sharded-``jit`` recipes;
* :mod:`~softadapt_jax.flax.nnx`: :func:`make_nnx_train_step` for Flax NNX modules;
* :mod:`~softadapt_jax.flax.rotograd`: RotoGrad (Javaloy & Valera 2022) as Linen modules;
* :mod:`~softadapt_jax.flax.checkpoints`: validated msgpack checkpoints.
"""

from softadapt_jax.flax import checkpoints, nnx, rotograd, train_state, train_step
from softadapt_jax.flax.checkpoints import CheckpointError, restore_checkpoint, save_checkpoint
from softadapt_jax.flax.nnx import make_nnx_train_step
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
    "checkpoints",
    "data_mesh",
    "data_shardings",
    "make_nnx_train_step",
    "make_pmap_train_step",
    "make_train_step",
    "nnx",
    "replicate",
    "restore_checkpoint",
    "rotograd",
    "save_checkpoint",
    "shard_batch",
    "train_state",
    "train_step",
    "unreplicate",
]
