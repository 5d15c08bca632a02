"""Fault injection on real processes, each fault written to the effect ledger."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

from idemtask.testing.ledger import EffectLedger


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (a prefork parent's pool processes), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return sorted(found)


class Faults:
    """Kill, stop and continue processes on a seeded schedule; every fault is logged."""

    def __init__(self, ledger: EffectLedger, seed: int = 0) -> None:
        self.ledger = ledger
        self.seed = seed
        self.random = random.Random(seed)
        self.log: list[tuple[str, int]] = []

    def _note(self, kind: str, pid: int) -> None:
        self.log.append((kind, pid))
        self.ledger.record(kind, key="", pid=pid)

    def kill(self, pid: int) -> None:
        """SIGKILL: the process dies at once, without running any handler (a crash, OOM)."""
        self._note("killed", pid)
        os.kill(pid, signal.SIGKILL)

    def stop(self, pid: int) -> None:
        """SIGSTOP: the process freezes (a GC pause, a stalled VM), its lease runs out."""
        self._note("stopped", pid)
        os.kill(pid, signal.SIGSTOP)

    def cont(self, pid: int) -> None:
        self._note("continued", pid)
        os.kill(pid, signal.SIGCONT)

    def running_bodies(self, pids: list[int]) -> list[int]:
        """Which of ``pids`` are inside a task body right now, according to the ledger."""
        open_runs: dict[int, int] = {}
        for entry in self.ledger.entries():
            if entry.kind == "start":
                open_runs[entry.pid] = open_runs.get(entry.pid, 0) + 1
            elif entry.kind == "end":
                open_runs[entry.pid] = open_runs.get(entry.pid, 0) - 1
        return [pid for pid in pids if open_runs.get(pid, 0) > 0]

    def pick(self, pids: list[int]) -> int | None:
        return self.random.choice(pids) if pids else None
