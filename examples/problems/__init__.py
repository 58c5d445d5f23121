"""Physics-informed problems with several loss components, for comparing loss balancers.

Each problem is a :class:`Problem` of pure functions; :func:`get_problem` builds one by
name::

    problem = get_problem("burgers")
    params = problem.init_params(jax.random.key(0))
    batch = problem.sample_batch(jax.random.key(1))
    losses = problem.loss_components(params, batch)  # [problem.num_losses]

Problems: ``"burgers"``, ``"helmholtz"``, ``"helmholtz_wang2021"`` (the learning-rate-annealing
authors' own Helmholtz set-up) and ``"wave"`` (the NTK paper's 1-D wave equation). A training
loop carries ``problem.init_points(key)`` and takes each step's points from
``problem.next_points`` (fresh points every step when ``problem.resample``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from problems.burgers import (
    burgers_exact,
    burgers_problem,
    burgers_reference_grid,
    burgers_residual,
    cached_burgers_reference,
)
from problems.common import (
    PointStream,
    Problem,
    init_mlp,
    input_moments,
    mlp_apply,
    relative_l2,
    sample_boxes,
    standardize,
)
from problems.helmholtz import (
    WANG2021_TRAINING,
    helmholtz_exact,
    helmholtz_problem,
    helmholtz_residual,
    helmholtz_source,
    helmholtz_wang2021_problem,
)
from problems.wave import wave_exact, wave_problem, wave_residual, wave_velocity

_FACTORIES: dict[str, Callable[..., Problem]] = {
    "burgers": burgers_problem,
    "helmholtz": helmholtz_problem,
    "helmholtz_wang2021": helmholtz_wang2021_problem,
    "wave": wave_problem,
}
PROBLEM_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_problem(name: str, **kwargs: Any) -> Problem:
    """Build a problem by name.

    Args:
      name: one of :data:`PROBLEM_NAMES` (``"burgers"``, ``"helmholtz"``,
        ``"helmholtz_wang2021"``, ``"wave"``).
      **kwargs: keyword arguments of the factory (:func:`burgers_problem`,
        :func:`helmholtz_problem`, :func:`helmholtz_wang2021_problem` or
        :func:`wave_problem`), e.g. ``hidden=(32, 32)``, ``num_residual=1024`` or
        ``resample=True``.

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
    "WANG2021_TRAINING",
    "PointStream",
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
    "helmholtz_wang2021_problem",
    "init_mlp",
    "input_moments",
    "mlp_apply",
    "relative_l2",
    "sample_boxes",
    "standardize",
    "wave_exact",
    "wave_problem",
    "wave_residual",
    "wave_velocity",
]
