"""Physics-informed problems with several loss components, for comparing loss balancers.

Each problem is a :class:`Problem` of pure functions; :func:`get_problem` builds one by
name::

    problem = get_problem("burgers")
    params = problem.init_params(jax.random.key(0))
    batch = problem.sample_batch(jax.random.key(1))
    losses = problem.loss_components(params, batch)  # [problem.num_losses]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from softadapt_jax.problems.burgers import (
    burgers_exact,
    burgers_problem,
    burgers_reference_grid,
    burgers_residual,
    cached_burgers_reference,
)
from softadapt_jax.problems.common import Problem, init_mlp, mlp_apply, relative_l2, sample_boxes
from softadapt_jax.problems.helmholtz import (
    helmholtz_exact,
    helmholtz_problem,
    helmholtz_residual,
    helmholtz_source,
)

_FACTORIES: dict[str, Callable[..., Problem]] = {
    "burgers": burgers_problem,
    "helmholtz": helmholtz_problem,
}
PROBLEM_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_problem(name: str, **kwargs: Any) -> Problem:
    """Build a problem by name.

    Args:
      name: one of :data:`PROBLEM_NAMES` (``"burgers"``, ``"helmholtz"``).
      **kwargs: keyword arguments of the factory (:func:`burgers_problem` or
        :func:`helmholtz_problem`), e.g. ``hidden=(32, 32)`` or ``num_residual=1024``.

    Returns:
      The :class:`Problem`.

    Raises:
      ValueError: for an unknown name.
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown problem {name!r}; known problems: {', '.join(PROBLEM_NAMES)}") from None
    return factory(**kwargs)


__all__ = [
    "PROBLEM_NAMES",
    "Problem",
    "burgers_exact",
    "burgers_problem",
    "burgers_reference_grid",
    "burgers_residual",
    "cached_burgers_reference",
    "get_problem",
    "helmholtz_exact",
    "helmholtz_problem",
    "helmholtz_residual",
    "helmholtz_source",
    "init_mlp",
    "mlp_apply",
    "relative_l2",
    "sample_boxes",
]
