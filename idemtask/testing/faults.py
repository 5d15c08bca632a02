"""Fault injection on real processes and servers, each fault written to the effect ledger."""

from __future__ import annotations

import os
import random
import signal
import tempfile
import time
from pathlib import Path

import redis

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


class ErrorReplies:
    """Make a ``redis-server`` answer writes with an error reply for a while, then restore it.

    Each fault is one way production Redis refuses writes while staying reachable:

    * ``oom``: ``maxmemory`` far below the memory in use, with ``noeviction``: writes fail
      with ``OOM command not allowed``;
    * ``readonly``: ``REPLICAOF`` a real loopback ``redis-server`` (``refusing_master``) that
      requires a password the store does not have. The store turns into a read-only replica
      (writes fail with ``READONLY``) whose sync never gets past authentication, so it keeps
      its own data: a replica only drops its data set when a full sync delivers the master's.
      ``REPLICAOF NO ONE`` makes it a master again with every record intact;
    * ``misconf``: a save point and ``stop-writes-on-bgsave-error yes``, and a ``BGSAVE``
      that fails because the server's directory was moved to one that no longer exists:
      writes fail with ``MISCONF``. The directory is then put back and a successful
      ``BGSAVE`` clears the error. The append-only file is not affected (it stays open).
      Needs ``enable-protected-configs yes`` (``CONFIG SET dir``).
    """

    KINDS = ("oom", "readonly", "misconf")

    def __init__(
        self,
        client: redis.Redis,
        *,
        scratch: Path,
        refusing_master: tuple[str, int] | None = None,
        ledger: EffectLedger | None = None,
    ) -> None:
        self.client = client
        self.scratch = scratch  # where the misconf fault makes (and removes) its directory
        self.refusing_master = refusing_master
        self.ledger = ledger
        self._undo: dict[str, dict[str, str]] = {}

    def begin(self, kind: str) -> None:
        if kind in self._undo:
            raise RuntimeError(f"the {kind} fault is already on")
        if self.ledger is not None:
            self.ledger.record(f"{kind}_begin", key="")
        getattr(self, f"_begin_{kind}")()

    def end(self, kind: str) -> None:
        getattr(self, f"_end_{kind}")(self._undo.pop(kind))
        if self.ledger is not None:
            self.ledger.record(f"{kind}_end", key="")

    def _saved(self, kind: str, *names: str) -> None:
        config = {name: str(self.client.config_get(name)[name]) for name in names}
        self._undo[kind] = config

    def _begin_oom(self) -> None:
        self._saved("oom", "maxmemory", "maxmemory-policy")
        self.client.config_set("maxmemory-policy", "noeviction")
        self.client.config_set("maxmemory", "1")

    def _end_oom(self, saved: dict[str, str]) -> None:
        self.client.config_set("maxmemory", saved["maxmemory"])
        self.client.config_set("maxmemory-policy", saved["maxmemory-policy"])

    def _begin_readonly(self) -> None:
        if self.refusing_master is None:
            raise RuntimeError("the readonly fault needs a refusing_master")
        self._undo["readonly"] = {}
        host, port = self.refusing_master
        self.client.replicaof(host, port)

    def _end_readonly(self, saved: dict[str, str]) -> None:
        self.client.replicaof("NO", "ONE")

    def _begin_misconf(self) -> None:
        self._saved("misconf", "dir", "save", "stop-writes-on-bgsave-error")
        gone = Path(tempfile.mkdtemp(prefix="misconf-", dir=self.scratch))
        self.client.config_set("stop-writes-on-bgsave-error", "yes")
        self.client.config_set("save", "3600 1")  # MISCONF needs a save point configured
        self.client.config_set("dir", str(gone))
        gone.rmdir()  # the BGSAVE child cannot create its temporary file
        self.client.bgsave()
        self._wait_bgsave("err")

    def _end_misconf(self, saved: dict[str, str]) -> None:
        self.client.config_set("dir", saved["dir"])
        self.client.bgsave()
        self._wait_bgsave("ok")
        self.client.config_set("save", saved["save"])
        self.client.config_set("stop-writes-on-bgsave-error", saved["stop-writes-on-bgsave-error"])

    def _wait_bgsave(self, status: str, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while True:
            info = self.client.info("persistence")
            if not info["rdb_bgsave_in_progress"] and info["rdb_last_bgsave_status"] == status:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"BGSAVE did not end with status {status}: {info}")
            time.sleep(0.02)
