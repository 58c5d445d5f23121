"""Shared timing helpers for the benchmark scripts (not a benchmark itself).

* :func:`time_interleaved` times several callables side by side: warm-up
  (compilation) first, then ``repeats`` rounds in which every callable runs
  ``number`` times, in a rotating order so that slow drift of the machine
  (frequency scaling, other processes) spreads over all of them. The median
  over rounds is reported.
* :func:`markdown_table` formats rows as a GitHub markdown table.
* :func:`add_jax_dispatch_option` / :func:`apply_jax_dispatch`: the
  ``--jax-dispatch {async,sync}`` option of the scripts that time lone calls.
* :func:`machine_info` collects what is needed to read the numbers: CPU model,
  core count, Python/JAX/jaxlib/NumPy versions, the JAX backend and the load
  average (timings on a shared, busy machine are inflated and noisy).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call times in seconds of one callable, one entry per round.

    ``samples`` are wall-clock times (``time.perf_counter``); ``cpu_samples``
    the CPU time of this process over the same calls (``time.process_time``,
    all threads). On a machine shared with other busy processes wall time is
    inflated by waiting for a core, CPU time much less so.
    """

    samples: tuple[float, ...]
    cpu_samples: tuple[float, ...] = ()

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """Relative interquartile range (0.05 = the middle half of rounds within 5%)."""
        if len(self.samples) < 4:
            return (max(self.samples) - min(self.samples)) / self.median
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / self.median


def block(x: Any) -> Any:
    """Waits for every array in ``x`` (JAX dispatch is asynchronous); returns ``x``."""
    return jax.block_until_ready(x)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    number: int | Mapping[str, int],
    warmup: int = 2,
    block_each: bool = False,
) -> dict[str, Timing]:
    """Times zero-argument callables side by side; returns per-call :class:`Timing` by name.

    Args:
      fns: name -> callable. A callable may carry state between calls (e.g. a
        training step that updates its own parameters).
      repeats: number of rounds; the reported statistic is the median.
      number: calls per round (one int, or one per name), so that a round
        lasts well above the timer resolution.
      warmup: calls made before timing (the first one compiles).
      block_each: wait for the result of every call (latency) instead of only
        the last one of a round (throughput of a dependent sequence of calls).

    Returns:
      name -> :class:`Timing` of seconds per call (wall and process CPU time).
    """
    names = list(fns)
    counts = {n: (number[n] if isinstance(number, Mapping) else number) for n in names}
    for name in names:
        for _ in range(warmup):
            block(fns[name]())
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            fn, n = fns[name], counts[name]
            out = None
            c0, t0 = time.process_time(), time.perf_counter()
            if block_each:
                for _ in range(n):
                    block(fn())
            else:
                for _ in range(n):
                    out = fn()
                block(out)
            t1, c1 = time.perf_counter(), time.process_time()
            wall[name].append((t1 - t0) / n)
            cpu[name].append((c1 - c0) / n)
    return {n: Timing(tuple(wall[n]), tuple(cpu[n])) for n in names}


def calls_per_round(fn: Callable[[], Any], target_seconds: float, *, cap: int = 100_000) -> int:
    """How many calls of (already compiled) ``fn`` fill about ``target_seconds``.

    Uses the fastest of a few probe calls, so one slow call on a busy machine
    does not shrink the rounds to a single call.
    """
    probes, spent = [], 0.0
    while len(probes) < 5 or (spent < 0.2 * target_seconds and len(probes) < 1000):
        t0 = time.perf_counter()
        block(fn())
        probes.append(time.perf_counter() - t0)
        spent += probes[-1]
        if spent > target_seconds:
            break
    one = max(min(probes), 1e-7)
    return int(max(1, min(cap, target_seconds / one)))


def fmt_us(seconds: float) -> str:
    """Seconds as microseconds with 3 significant digits."""
    us = seconds * 1e6
    if us >= 100:
        return f"{us:,.0f}"
    if us >= 10:
        return f"{us:.1f}"
    return f"{us:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one char per column, ``l`` or ``r`` (default: first left)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(headers))]  # "--:" at least
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(row: Sequence[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = ["-" * (w - 1) + ":" if a == "r" else "-" * w for w, a in zip(widths, align, strict=True)]
    return "\n".join([line(cells[0]), "| " + " | ".join(rule) + " |", *(line(r) for r in cells[1:])])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for row in f:
                if row.lower().startswith("model name"):
                    return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """CPU model, cores, versions, JAX backend and load, for the header of a results table."""
    import jaxlib
    import numpy as np

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "x64": str(bool(jax.config.jax_enable_x64)),
        "load average (1 min)": _load_average(),
    }


def _load_average() -> str:
    """The 1-minute load average: above the core count, other processes share the CPU."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "n/a"


def machine_info_markdown() -> str:
    """:func:`machine_info` as one markdown line."""
    return "; ".join(f"**{k}**: {v}" for k, v in machine_info().items())


def add_jax_dispatch_option(parser: argparse.ArgumentParser) -> None:
    """Adds ``--jax-dispatch {async,sync}`` (default ``async``, JAX's own default) to ``parser``."""
    parser.add_argument(
        "--jax-dispatch",
        choices=("async", "sync"),
        default="async",
        help="JAX's CPU dispatch: 'async' (JAX's default: a worker thread runs each call) or 'sync' "
        "(jax_cpu_enable_async_dispatch=False: the calling thread runs it, as torch does)",
    )


def apply_jax_dispatch(mode: str) -> None:
    """Sets JAX's CPU dispatch mode; call it before the first computation.

    JAX reads the setting once, when it creates its CPU client, so a later
    change has no effect: the two modes are compared in two runs.
    """
    jax.config.update("jax_cpu_enable_async_dispatch", mode == "async")
