"""Whole-system CPU time from ``/proc``: the publisher, every worker process, both servers.

Wall time on a shared machine moves with everybody else's load; CPU time spent by the
benchmark's own processes moves far less, so the cost the guard adds is measured as CPU.

A process's CPU is the sum over its threads of ``/proc/<pid>/task/<tid>/schedstat``'s
first field (nanoseconds on the CPU; ``utime + stime`` from ``/proc/<pid>/task/<tid>/stat``
in clock ticks where schedstat is missing), plus ``cutime + cstime`` from
``/proc/<pid>/stat``: what its children that it already reaped spent. A worker is its
whole process tree (parent and every descendant, found by walking ``/proc/*/stat``'s
parent pids), so a pool child that exits and is reaped between two readings is still
counted, in its parent's ``cutime``. A thread that exits between two readings is lost; the
workers' threads (pool, consumer, heartbeat threads) live as long as the process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[str] | None:
    """The fields after the command name (which may hold spaces and parentheses)."""
    try:
        text = path.read_text()
    except OSError:  # the process or thread is gone
        return None
    return text.rsplit(")", 1)[1].split()


def _thread_seconds(task: Path) -> float:
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        fields = _stat_fields(task / "stat")
        # state is field 3 of stat, so utime (14) and stime (15) are at 11 and 12 here
        return (int(fields[11]) + int(fields[12])) * TICK if fields else 0.0


def process_seconds(pid: int) -> float:
    """CPU seconds of one process: its threads, and its children it already reaped."""
    root = PROC / str(pid)
    fields = _stat_fields(root / "stat")
    if fields is None:
        return 0.0
    reaped = (int(fields[13]) + int(fields[14])) * TICK  # cutime, cstime
    try:
        tasks = list((root / "task").iterdir())
    except OSError:
        return reaped
    return reaped + sum(_thread_seconds(task) for task in tasks)


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from the parent pid of each ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry / "stat")
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


def tree_seconds(root: int) -> float:
    return sum(process_seconds(pid) for pid in descendants(root))


@dataclass(frozen=True)
class Reading:
    """CPU seconds of each watched part at one moment, and the wall clock."""

    wall: float
    parts: Mapping[str, float]


class CpuMeter:
    """Reads the CPU of named process trees (the worker, the servers) on demand."""

    def __init__(self, trees: Mapping[str, int]) -> None:
        self.trees = dict(trees)

    def read(self) -> Reading:
        return Reading(
            time.perf_counter(), {name: tree_seconds(pid) for name, pid in self.trees.items()}
        )

    @staticmethod
    def spent(before: Reading, after: Reading, names: Iterable[str] | None = None) -> float:
        chosen = names if names is not None else after.parts
        return sum(after.parts[name] - before.parts[name] for name in chosen)

    @staticmethod
    def delta(before: Reading, after: Reading) -> dict[str, float]:
        return {name: after.parts[name] - before.parts[name] for name in after.parts}
