"""Figures from the end-to-end runs (:mod:`benchmarks.e2e`): every comparison is made
within one round and one body duration, then summarised as the median over rounds with
the per-round spread, so a figure never compares runs made at different times."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.common import median, percentile

US = 1e6
Record = Mapping[str, Any]


@dataclass(frozen=True)
class Spread:
    """The median of per-round values and how far the rounds strayed from it."""

    median: float
    low: float
    high: float
    count: int

    @property
    def percent(self) -> float:
        """The largest distance of a round from the median, in % of the median."""
        if not self.median:
            return float("nan")
        return max(self.high - self.median, self.median - self.low) / abs(self.median) * 100

    def text(self, digits: int = 2) -> str:
        return (
            f"{self.median:.{digits}f} (range {self.low:.{digits}f}–{self.high:.{digits}f} "
            f"over {self.count}, ±{self.percent:.0f} %)"
        )


def spread(values: Sequence[float]) -> Spread:
    if not values:
        nan = float("nan")
        return Spread(nan, nan, nan, 0)
    return Spread(median(values), min(values), max(values), len(values))


def _cells(runs: Sequence[Record]) -> dict[tuple[int, float], dict[str, Record]]:
    """{(round, body_ms): {variant: run}}."""
    cells: dict[tuple[int, float], dict[str, Record]] = {}
    for run in runs:
        cells.setdefault((run["round"], run["body_ms"]), {})[run["variant"]] = run
    return cells


def per_cell(
    runs: Sequence[Record],
    value: Callable[[Mapping[str, Record]], float],
    names: Sequence[str],
    body_ms: float | None = None,
) -> list[float]:
    """``value`` of every (round, body) cell that holds all of ``names``; one body only if
    ``body_ms`` is given."""
    return [
        value(cell)
        for (_, body), cell in sorted(_cells(runs).items())
        if all(name in cell for name in names) and (body_ms is None or body == body_ms)
    ]


def bodies(runs: Sequence[Record]) -> list[float]:
    return sorted({run["body_ms"] for run in runs})


def throughput_ratio(runs: Sequence[Record], variant: str, baseline: str, body_ms: float) -> Spread:
    """Worker tasks/s of ``variant`` over ``baseline``'s, per round, at one body duration."""

    def ratio(cell: Mapping[str, Record]) -> float:
        return float(cell[variant]["tasks_per_second"] / cell[baseline]["tasks_per_second"])

    return spread(per_cell(runs, ratio, (variant, baseline), body_ms))


def tasks_per_second(runs: Sequence[Record], variant: str, body_ms: float) -> float:
    return median(
        [r["tasks_per_second"] for r in runs if r["variant"] == variant and r["body_ms"] == body_ms]
    )


def cpu_added(
    runs: Sequence[Record],
    variant: str,
    baseline: str,
    body_ms: float | None = None,
    part: str | None = None,
) -> Spread:
    """Whole-system CPU µs per call that ``variant`` spends beyond ``baseline`` in the same
    round and body: (variant CPU − baseline CPU) / calls. ``part``: one process only
    (``publisher``, ``worker``, ``broker``, ``store``)."""

    def cpu(run: Record) -> float:
        if part is None:
            return float(run["system_cpu_seconds"])
        if part == "publisher":
            return float(run["publisher_cpu_seconds"])
        return float(run["cpu_seconds"][part])

    def added(cell: Mapping[str, Record]) -> float:
        calls = int(cell[baseline]["calls"])
        return (cpu(cell[variant]) - cpu(cell[baseline])) / calls * US

    return spread(per_cell(runs, added, (variant, baseline), body_ms))


def cpu_per_duplicate(runs: Sequence[Record], duplicates: str) -> Spread:
    """Whole-system CPU µs of one duplicate call, per run: the publisher's and the servers'
    CPU while the duplicates alone were sent (the worker stopped), over their number."""

    def per_duplicate(run: Record) -> float:
        spent = run["duplicates_publisher_cpu_seconds"] + sum(
            run["duplicates_cpu_seconds"].values()
        )
        return float(spent / run["duplicates"] * US)

    return spread([per_duplicate(r) for r in runs if r["variant"] == duplicates])


def publish_us(runs: Sequence[Record], variant: str, field: str = "publish_seconds") -> Spread:
    """Publisher wall (or, with ``publisher_cpu_seconds``, CPU) µs per call of a variant."""
    return spread([float(r[field] / r["calls"] * US) for r in runs if r["variant"] == variant])


def duplicate_publish_us(
    runs: Sequence[Record], duplicates: str, field: str = "duplicates_publish_seconds"
) -> Spread:
    """Publisher wall (or CPU, ``duplicates_publisher_cpu_seconds``) µs per duplicate call."""
    return spread(
        [float(r[field] / r["duplicates"] * US) for r in runs if r["variant"] == duplicates]
    )


def duplicate_speedup(runs: Sequence[Record], duplicates: str, plain: str) -> Spread:
    """How many times faster the publisher is done with a duplicate call than with a plain
    (real) enqueue in the same round and body."""

    def speedup(cell: Mapping[str, Record]) -> float:
        dup = cell[duplicates]
        real = cell[plain]["publish_seconds"] / cell[plain]["calls"]
        return float(real / (dup["duplicates_publish_seconds"] / dup["duplicates"]))

    return spread(per_cell(runs, speedup, (duplicates, plain)))


@dataclass(frozen=True)
class Latency:
    """Enqueue-to-result latency of one variant, every round's samples pooled."""

    p50_us: float
    p99_us: float
    samples: int


def latency(runs: Sequence[Record], variant: str) -> Latency:
    samples = [s for run in runs if run["variant"] == variant for s in run["samples_us"]]
    return Latency(percentile(samples, 50), percentile(samples, 99), len(samples))
