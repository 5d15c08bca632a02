"""CPU per store call: what this process, and the store's server, spend on one EVALSHA.

All against the store's own redis-server, which serves nothing else meanwhile. The client's
CPU is this process's (``time.process_time``); the server's is read from ``/proc`` for the
store's ``redis-server`` around the same calls (``benchmarks.cpu``). Their sum for the raw
socket and the store's own scripts is the least a round trip costs the whole system, so
three of them are the floor under a unique task's added CPU. The paths:

* ``raw socket``: a pre-packed EVALSHA written to a plain socket, the reply read back as
  bytes (what any client must at least spend: the baseline);
* ``redis-py Script``: the same script through ``Script.__call__`` (``evalsha`` on the
  client's command path);
* ``idemtask wire``: the same script through ``idemtask.store.wire.ScriptCaller``;
* ``RedisStore acquire+complete``: a task's two execute-side calls, through redis-py's
  command path (``lean_calls=False``) and through the store's own path, per call.

The variants alternate round by round (the order rotated); each figure is the median over
the rounds, and each ratio the median of the ratios taken within a round.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis

from benchmarks.common import Servers, median, rounds
from benchmarks.cpu import process_seconds
from idemtask.store import Acquired, Completed, RedisStore
from idemtask.store.wire import ScriptCaller
from idemtask.testing.launcher import LOOPBACK
from idemtask.testing.progress import Progress

US = 1e6
ROUNDS = 9
RAW = "raw socket"
REDIS_PY = "redis-py Script"
WIRE = "idemtask wire"
STORE_OLD = "RedisStore acquire+complete, redis-py path"
STORE_LEAN = "RedisStore acquire+complete, lean path"
#: A reply shaped like the store's (a short array of strings and integers), no server work.
SCRIPT = "return {'ACQUIRED', ARGV[1], 1, 0, 1}"
ACQUIRE: dict[str, Any] = {
    "task_name": "bench.storecalls",
    "fingerprint": "fp",
    "lease_ms": 60_000,
    "max_deliveries": 5,
    "ttl_ms": 60_000,
}


class RawCaller:
    """A plain socket, one command packed once: send it, read the known-length reply."""

    def __init__(self, host: str, port: int, sha: str, key: str, arg: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        parts = ["EVALSHA", sha, "1", key, arg]
        packed = f"*{len(parts)}\r\n" + "".join(f"${len(p)}\r\n{p}\r\n" for p in parts)
        self.packed = packed.encode()
        self.sock.sendall(self.packed)
        self.size = len(self.sock.recv(65536))  # the reply is the same every time
        assert self.size > 0

    def call(self) -> None:
        self.sock.sendall(self.packed)
        got = self.sock.recv(65536)
        while len(got) < self.size:
            got += self.sock.recv(65536)

    def close(self) -> None:
        self.sock.close()


def _store_task(store: RedisStore, run: str) -> Callable[[int], None]:
    def task(n: int) -> None:
        key = f"{run}-{n}"
        out = store.acquire(key, task_id="t", attempt_id="a", **ACQUIRE)
        assert isinstance(out, Acquired), out
        done = store.complete(key, attempt_id="a", token=out.token, result=b"1", result_ttl_ms=1)
        assert isinstance(done, Completed), done

    return task


def _cpu_per_call(
    call: Callable[[int], None], start: int, calls: int, per: int, server_pid: int
) -> tuple[float, float]:
    """µs of this process's CPU, and of the server's, per store call (``per`` store calls
    per ``call``)."""
    server_began = process_seconds(server_pid)
    began = time.process_time()
    for n in range(start, start + calls):
        call(n)
    client = time.process_time() - began
    server = process_seconds(server_pid) - server_began
    return client / (calls * per) * US, server / (calls * per) * US


def bench_store_calls(
    servers: Servers,
    calls: int,
    round_count: int = ROUNDS,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Median client CPU µs per call for each path, and each path's ratio to the raw socket
    within its round; ``progress`` counts the runs."""
    progress = progress or Progress.off()
    url = servers.store_url
    client = redis.Redis.from_url(url)
    script = client.register_script(SCRIPT)
    client.script_load(SCRIPT)
    key, arg = "bench:{storecalls}", "t1"
    raw = RawCaller(LOOPBACK, servers.store.port, script.sha, key, arg)
    wire = ScriptCaller(client)
    old = RedisStore.from_url(url, lean_calls=False, prefix="bench-old")
    lean = RedisStore.from_url(url, prefix="bench-lean")
    run = uuid.uuid4().hex[:12]
    server_pid = servers.store.pid
    assert server_pid is not None, "the store's server is not running"
    variants: dict[str, tuple[Callable[[int], None], int]] = {
        RAW: (lambda n: raw.call(), 1),
        REDIS_PY: (lambda n: script(keys=[key], args=[arg]), 1),
        WIRE: (lambda n: wire.call(script.sha, SCRIPT, key, (arg,)), 1),
        STORE_OLD: (_store_task(old, run), 2),
        STORE_LEAN: (_store_task(lean, run), 2),
    }
    for call, _ in variants.values():  # connections, scripts and caches, before timing
        for n in range(-50, 0):
            call(n)
    runs: list[dict[str, Any]] = []
    offset = 0
    progress.begin("runs", round_count * len(variants))
    try:
        for index, name in rounds(list(variants), round_count):
            progress.update(round=f"{index + 1}/{round_count}")
            call, per = variants[name]
            cpu, server = _cpu_per_call(call, offset, calls, per, server_pid)
            offset += calls
            runs.append(
                {
                    "round": index,
                    "variant": name,
                    "cpu_us_per_call": cpu,
                    "server_cpu_us_per_call": server,
                }
            )
            progress.update(advance=1)
    finally:
        raw.close()
        for store in (old, lean):
            store.client.close()
        client.close()
    return {
        "calls_per_round": calls,
        "rounds": round_count,
        "parser": type(lean.client.connection_pool.make_connection()._parser).__name__,
        "runs": runs,
        "summary": summarize(runs),
    }


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per variant: the median CPU µs per call, and the median within-round ratio to the
    raw socket."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["variant"]] = run["cpu_us_per_call"]
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(run["variant"] for run in runs):
        values = [r[name] for r in by_round.values() if name in r]
        ratios = [r[name] / r[RAW] for r in by_round.values() if name in r and RAW in r]
        server = [r["server_cpu_us_per_call"] for r in runs if r["variant"] == name]
        out[name] = {
            "cpu_us_per_call": median(values),
            "ratio_to_raw": median(ratios),
            "server_cpu_us_per_call": median(server),
        }
    saved = [r[STORE_OLD] - r[STORE_LEAN] for r in by_round.values() if STORE_OLD in r]
    out["saved"] = {"cpu_us_per_call": median(saved), "cpu_us_per_unique_task": 3 * median(saved)}
    lean = out[STORE_LEAN]
    # a raw socket's client CPU with the store's scripts on the server: no client spends less
    floor = out[RAW]["cpu_us_per_call"] + lean["server_cpu_us_per_call"]
    out["floor"] = {
        "cpu_us_per_call": floor,
        "cpu_us_per_unique_task": 3 * floor,
        "lean_us_per_unique_task": 3 * (lean["cpu_us_per_call"] + lean["server_cpu_us_per_call"]),
    }
    return out


def summary_lines(results: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(measure, figure) rows for the report's table."""
    if not results:
        return []
    summary = results["summary"]
    lines = [
        (
            f"client CPU per EVALSHA, {name} (µs; {results['parser']}, median of "
            f"{results['rounds']} rounds; ×raw socket in-round; store server "
            f"{values['server_cpu_us_per_call']:.1f})",
            f"{values['cpu_us_per_call']:.1f} (×{values['ratio_to_raw']:.2f})",
        )
        for name, values in summary.items()
        if name not in ("saved", "floor")
    ]
    saved = summary["saved"]
    lines.append(
        (
            "client CPU saved by the lean path (µs per call; per unique task, 3 calls)",
            f"{saved['cpu_us_per_call']:.1f} ({saved['cpu_us_per_unique_task']:.0f})",
        )
    )
    floor = summary["floor"]
    lines.append(
        (
            "whole-system CPU floor per unique task: 3 round trips, raw-socket client + the "
            "store's scripts on the server (µs; through the store's own path "
            f"{floor['lean_us_per_unique_task']:.0f})",
            f"{floor['cpu_us_per_unique_task']:.0f}",
        )
    )
    return lines
