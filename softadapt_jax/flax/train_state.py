"""A Flax ``TrainState`` whose ``apply_gradients`` hands the losses to the optimizer."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax.training import train_state

from softadapt_jax.transform import get_weights


class BalancedTrainState(train_state.TrainState):
    """A Flax ``TrainState`` whose ``apply_gradients`` passes ``losses`` to ``tx.update``.

    Flax's own ``apply_gradients(**kwargs)`` replaces dataclass fields with
    ``kwargs`` and never hands them to the optimizer, so a balancer inside
    ``tx`` would not see the losses.
    """

    def apply_gradients(
        self, *, grads: Any, losses: Any = None, statistics: Any = None, **kwargs: Any
    ) -> BalancedTrainState:
        """Applies ``grads`` and records ``losses`` (``[K]``) in the balancer.

        Args:
          grads: gradients with the structure of ``params``.
          losses: the current component losses, forwarded to ``tx.update``.
          statistics: the gradient statistic for balancers that need one.
          **kwargs: other dataclass fields to replace, as in Flax.

        Returns:
          The updated state (``step`` + 1).
        """
        updates, opt_state = self.tx.update(
            grads, self.opt_state, self.params, losses=losses, statistics=statistics
        )
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
            **kwargs,
        )

    @property
    def weights(self) -> jax.Array:
        """The balancer's current weights ``[K]``."""
        return get_weights(self.opt_state)
