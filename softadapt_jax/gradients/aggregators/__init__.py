"""Jacobian aggregators by name: ``aggregator(name, **config)`` and their optax adapter.

Names and constructor arguments follow torchjd's classes (snake_case of the
class name, the same keyword arguments); methods that only LibMTL has use
LibMTL's names. Each method lives in its own module and reproduces its
original implementation by default; the other library's form is a named
option. See README's Fidelity table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from softadapt_jax.gradients.aggregators._core import Aggregator, from_weighting
from softadapt_jax.gradients.aggregators.optax_adapter import aggregate

# Modules that define methods; each exports AGGREGATORS: {name: factory(**config) -> Aggregator}.
_METHOD_MODULES: tuple[str, ...] = (
    # torchjd's aggregators (0.18.0), with LibMTL's forms as options
    "mean_sum",
    "upgrad",
    "dual_proj",
    "mgda",
    "cagrad",
    "imtl_g",
    "aligned_mtl",
    "config",
    "fairgrad",
    "trimmed_mean",
    "krum",
    "nash_mtl",
    "pcd",
    "excess_mtl",
    "pcgrad",
    "gradvac",
    "graddrop",
    "random",
    # LibMTL's methods that torchjd does not have
    "gls",
    "stch",
    "famo",
    "db_mtl",
    "moco",
    "modo",
    "sdmgrad",
    "imtl",
)


def _registry() -> dict[str, Callable[..., Aggregator]]:
    table: dict[str, Callable[..., Aggregator]] = {}
    for mod in _METHOD_MODULES:
        for name, factory in importlib.import_module(f"{__name__}.{mod}").AGGREGATORS.items():
            if name in table:
                raise RuntimeError(f"aggregator {name!r} is defined twice (second time in {mod}).")
            table[name] = factory
    return table


def names() -> tuple[str, ...]:
    """The registered aggregator names, sorted."""
    return tuple(sorted(_registry()))


def aggregator(name: str, **config: Any) -> Aggregator:
    """The aggregator called ``name``, configured by ``config``.

    Args:
      name: torchjd's class name in snake_case (``"upgrad"``, ``"mgda"``,
        ``"aligned_mtl"``, ...) or a LibMTL-only method's name; see
        :func:`names`.
      **config: the method's constructor arguments (torchjd's names), all
        keyword-only and static.

    Returns:
      An :class:`Aggregator`; stateless ones are called as ``agg(jacobian)``.

    Raises:
      ValueError: an unknown ``name`` (the message lists the known ones) or a
        configuration the method rejects.
    """
    table = _registry()
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"`name` must be one of {sorted(table)}, got {name!r}.")
    return table[name](**config)


__all__ = ["Aggregator", "aggregate", "aggregator", "from_weighting", "names"]
