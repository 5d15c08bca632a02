"""Shared pieces: statistics, alternated rounds, Redis command accounting, machine facts.

The benchmarks run on shared, noisy machines, so no figure stands alone: variants are
measured in alternated rounds (each round rotates the order, so no variant always runs
first or last) and compared as ratios of medians taken in the same run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import redis

from idemtask.testing.launcher import RedisServer, terminate_session

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100): no interpolation between samples."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rotated(variants: Sequence[T], index: int) -> list[T]:
    """The variants in round ``index``'s order: rotated by one each round (A B C, B C A, ...),
    so slow drifts in machine load fall on every variant alike."""
    shift = index % len(variants) if variants else 0
    return [*variants[shift:], *variants[:shift]]


def rounds(variants: Sequence[T], count: int) -> Iterator[tuple[int, T]]:
    """Every variant once per round, in :func:`rotated` order."""
    for index in range(count):
        for variant in rotated(variants, index):
            yield index, variant


# -------------------------------------------------------------------------------------------
# Servers


@dataclass
class Servers:
    """The broker/result-backend server and a server dedicated to the guard's store (and the
    other libraries' locks), so its command counts contain nothing else."""

    broker: RedisServer
    store: RedisServer

    def db(self, number: int) -> str:
        return f"redis://127.0.0.1:{self.broker.port}/{number}"

    @property
    def broker_url(self) -> str:
        return self.db(0)

    @property
    def backend_url(self) -> str:
        return self.db(1)

    @property
    def store_url(self) -> str:
        return self.store.url


@contextmanager
def servers() -> Iterator[Servers]:
    # Eviction stays off (the store's own doctor requires noeviction).
    config = {"maxmemory-policy": "noeviction"}
    with RedisServer(config=config) as broker, RedisServer(config=config) as store:
        yield Servers(broker, store)


# -------------------------------------------------------------------------------------------
# Redis command accounting


def _script_commands() -> frozenset[str]:
    """The commands idemtask's Lua scripts call (read from the scripts themselves)."""
    found: set[str] = set()
    lua = resources.files("idemtask.store") / "lua"
    for entry in lua.iterdir():
        if entry.name.endswith(".lua"):
            found.update(
                name.lower() for name in re.findall(r"redis\.call\('(\w+)'", entry.read_text())
            )
    return frozenset(found)


#: Commands that only ever run inside idemtask's scripts in these benchmarks. INFO
#: commandstats counts a command a script runs exactly like one a client sends, so these
#: are reported apart from what clients sent.
SCRIPT_COMMANDS = _script_commands()
#: The accounting's own commands, never part of a figure.
_OWN = frozenset({"info", "config|resetstat", "flushdb", "flushall", "memory|usage", "ping"})
_CLIENT_PREFIXES = ("evalsha", "eval", "script|", "fcall")
#: A connection's handshake: sent once per connection a client opens (the store keeps one
#: per thread, and opens it again after a server dropped it), not per task, so reported
#: apart (``connections``) rather than in the per-task counts.
HANDSHAKE = frozenset({"hello", "auth", "select", "client|setinfo", "client|setname"})


def command_calls(client: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls}."""
    stats: Mapping[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


@dataclass
class CommandDelta:
    """Commands a server ran between two snapshots, split into those clients sent and
    those run inside idemtask's Lua scripts."""

    sent: dict[str, int] = field(default_factory=dict)
    in_scripts: dict[str, int] = field(default_factory=dict)
    handshakes: dict[str, int] = field(default_factory=dict)

    @property
    def sent_total(self) -> int:
        return sum(self.sent.values())

    @property
    def in_scripts_total(self) -> int:
        return sum(self.in_scripts.values())


def command_delta(before: Mapping[str, int], after: Mapping[str, int]) -> CommandDelta:
    """EVALSHA/EVAL/SCRIPT and every command no idemtask script calls count as sent by a
    client; the commands the scripts call (TIME, HMGET, HSET, ...) as run inside scripts.
    The benchmarks' own clients send none of the latter outside a script, and the in-process
    count checks this split against what the client itself wrote to the socket."""
    delta = CommandDelta()
    for name, calls in after.items():
        count = calls - before.get(name, 0)
        if count <= 0 or name in _OWN:
            continue
        if name in HANDSHAKE:
            delta.handshakes[name] = count
        elif name.startswith(_CLIENT_PREFIXES) or name not in SCRIPT_COMMANDS:
            delta.sent[name] = count
        else:
            delta.in_scripts[name] = count
    return delta


def wait_results(
    client: redis.Redis,
    keys: Sequence[str],
    timeout: float,
    interval: float = 0.002,
    finished: Callable[[bytes | None], bool] | None = None,
) -> None:
    """Return once every key holds a result: exists, or (with ``finished``) holds a value
    ``finished`` accepts (Celery stores STARTED under the same key before the result). Until
    the last key is done only that one is polled, one single-key read per ``interval``;
    then the rest are checked 256 at a time, so the polling costs the servers next to
    nothing: tasks finish roughly in the order they were published."""

    def done(chunk: Sequence[str]) -> bool:
        if finished is None:
            return int(client.exists(*chunk)) == len(chunk)
        values: list[Any] = client.mget(chunk)
        return all(finished(value) for value in values)

    deadline = time.monotonic() + timeout
    pending = list(keys)
    while pending:
        if done(pending[-1:]) and done(pending[:256]):
            del pending[:256]
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} results still missing after {timeout:.0f}s")
        time.sleep(interval)


# -------------------------------------------------------------------------------------------
# Machine facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _redis_version() -> str:
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out.strip()


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """What the figures were measured on (recorded next to them)."""
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "redis_server": _redis_version(),
        "redis_py": _version("redis"),
        "celery": _version("celery"),
        "dramatiq": _version("dramatiq"),
        "celery_once": _version("celery_once"),
        "celery_singleton": _version("celery-singleton"),
        "platform": platform.platform(),
        "load_at_start": load_average(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


class WorkerProcess:
    """A framework's worker command (``python -m ...``) as a subprocess in its own session,
    pointed at the benchmark's servers, logging to a temporary file."""

    def __init__(self, name: str, servers: Servers, args: Sequence[str]) -> None:
        self.name = name
        self.log = Path(tempfile.mkdtemp(prefix="idemtask-bench-")) / f"{name.lower()}-worker.log"
        env = dict(os.environ)
        env.update(
            BENCH_BROKER=servers.broker_url,
            BENCH_BACKEND=servers.backend_url,
            BENCH_STORE=servers.store_url,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        )
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                env=env,
                cwd=ROOT,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"the {self.name} worker exited ({self.proc.returncode}):\n{tail}")

    def pause(self) -> None:
        """SIGSTOP the worker's whole session (parent and pool), so it consumes nothing
        while the queue fills; :meth:`resume` lets it start."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.resume()  # a stopped process would not act on SIGTERM
        terminate_session(self.proc, grace=30)
