"""What only a real Redis shows: restarts, lost scripts, outages, processes, round trips."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from idemtask.errors import StoreUnavailable
from idemtask.store import Lease, RedisStore, Status

from servers import RedisServer

ACQUIRE: dict[str, Any] = {
    "task_name": "shop.charge",
    "fingerprint": "fp",
    "lease_ms": 10_000,
    "max_deliveries": 5,
    "ttl_ms": 60_000,
}


def test_record_is_one_hash_tagged_key(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, prefix="shop")
    store.acquire("abc123", task_id="t", attempt_id="a", **ACQUIRE)
    names = store.client.keys("*")
    assert names == [b"shop:{abc123}"]
    assert store.client.type("shop:{abc123}") == b"hash"
    assert store.client.pttl("shop:{abc123}") > 0


def test_scripts_reload_after_flush_and_restart(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    server = fresh_redis(appendonly=True)
    store = RedisStore.from_url(server.url)
    out = store.acquire("k1", task_id="t", attempt_id="a", **ACQUIRE)
    assert out.status is Status.ACQUIRED
    store.client.script_flush()
    assert store.renew(Lease("k1", "a", out.token, 10_000)) is True
    server.restart()
    # The record survived (appendonly) and the scripts are loaded again on NOSCRIPT.
    done = store.complete("k1", attempt_id="a", token=out.token, result=b"7", result_ttl_ms=60_000)
    assert done.status is Status.COMPLETED
    replay = store.acquire("k1", task_id="t2", attempt_id="b", **ACQUIRE)
    assert replay.status is Status.DONE and replay.result is not None
    assert replay.result.data == b"7"


def test_unreachable_store_raises_store_unavailable(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    server = fresh_redis()
    store = RedisStore.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    store.ping()
    server.stop()
    with pytest.raises(StoreUnavailable):
        store.acquire("k1", task_id="t", attempt_id="a", **ACQUIRE)
    with pytest.raises(StoreUnavailable):
        store.renew_many([Lease("k1", "a", 1, 1000)])
    with pytest.raises(StoreUnavailable):
        store.ping()
    server.start()
    assert store.acquire("k1", task_id="t", attempt_id="a", **ACQUIRE).status is Status.ACQUIRED


def _contend(url: str, keys: list[str], barrier: Any, results: Any, worker: int) -> None:
    store = RedisStore.from_url(url)
    for key in keys:
        barrier.wait()
        out = store.acquire(key, task_id="t", attempt_id=f"w{worker}", **ACQUIRE)
        results.put((key, out.status.value))


def test_four_processes_one_key_exactly_one_acquires(redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    keys = [uuid.uuid4().hex for _ in range(200)]
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_contend, args=(redis_url, keys, barrier, results, i)) for i in range(4)
    ]
    for p in procs:
        p.start()
    answers = [results.get(timeout=120) for _ in range(4 * len(keys))]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    by_key: dict[str, list[str]] = {}
    for key, status in answers:
        by_key.setdefault(key, []).append(status)
    assert len(by_key) == 200
    for statuses in by_key.values():
        assert sorted(statuses) == ["acquired", "busy", "busy", "busy"]


class CommandLog:
    """Counts the commands a client sends, read on the server through MONITOR."""

    def __init__(self, url: str) -> None:
        self._monitor = redis.Redis.from_url(url).monitor()
        self._monitor.connection.send_command("MONITOR")
        self._monitor.connection.read_response()
        self.lines: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.lines.append(self._monitor.next_command())
            except Exception:
                return

    def close(self, last: str = "PING") -> list[dict[str, Any]]:
        """Stop once the reader has seen ``last``, the caller's final command: stopping
        earlier could drop the commands still in flight (a busy machine reads them late)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            str(line.get("command", "")).startswith(last) for line in list(self.lines)
        ):
            time.sleep(0.01)
        self._stop.set()
        self._monitor.connection.disconnect()
        self._thread.join(timeout=5)
        return self.lines


@pytest.fixture
def counted(fresh_redis: Callable[..., RedisServer]) -> Iterator[tuple[RedisStore, str]]:
    server = fresh_redis()
    store = RedisStore.from_url(server.url)
    store.ping()
    # Load every script once so the count shows steady-state traffic.
    store.acquire("warm", task_id="t", attempt_id="a", **ACQUIRE)
    store.renew(Lease("warm", "a", 1, 1000))
    store.complete("warm", attempt_id="a", token=1, result=b"1", result_ttl_ms=1000)
    store.reserve(
        "warm2", task_id="t", task_name="n", fingerprint="", reservation_ms=10, ttl_ms=1000
    )
    store.cancel("warm2", task_id="t")
    store.acquire("warm3", task_id="t", attempt_id="a", **ACQUIRE)
    store.release("warm3", attempt_id="a", token=1, error="e", terminal=False, ttl_ms=1000)
    yield store, server.url


def _client_commands(lines: list[dict[str, Any]], marker: str) -> list[str]:
    """Commands sent by clients (not from inside scripts) between the two marker ECHOs."""
    names = [
        line["command"]
        for line in lines
        if line.get("client_type") != "lua" and line.get("client_address") != "lua"
    ]
    start = names.index(f"ECHO {marker}-start")
    end = names.index(f"ECHO {marker}-end")
    return names[start + 1 : end]


def test_each_transition_is_exactly_one_command(counted: tuple[RedisStore, str]) -> None:
    store, url = counted
    transitions: dict[str, Callable[[], object]] = {
        "reserve": lambda: store.reserve(
            "k", task_id="t", task_name="n", fingerprint="f", reservation_ms=1000, ttl_ms=60_000
        ),
        "reserve-duplicate": lambda: store.reserve(
            "k", task_id="t2", task_name="n", fingerprint="f", reservation_ms=1000, ttl_ms=60_000
        ),
        "cancel": lambda: store.cancel("k", task_id="t"),
        "acquire": lambda: store.acquire("k", task_id="t", attempt_id="a", **ACQUIRE),
        "acquire-busy": lambda: store.acquire("k", task_id="t", attempt_id="b", **ACQUIRE),
        "renew": lambda: store.renew(Lease("k", "a", 1, 10_000)),
        "renew-many-3": lambda: store.renew_many([Lease("k", "a", 1, 10_000)] * 3),
        "complete": lambda: store.complete(
            "k", attempt_id="a", token=1, result=b"1", result_ttl_ms=60_000
        ),
        "acquire-replay": lambda: store.acquire("k", task_id="t", attempt_id="c", **ACQUIRE),
    }
    log = CommandLog(url)
    counts: dict[str, int] = {}
    try:
        for name, op in transitions.items():
            store.client.echo(f"{name}-start")
            op()
            store.client.echo(f"{name}-end")
        store.client.ping()
    finally:
        lines = log.close()
    for name in transitions:
        sent = _client_commands(lines, name)
        counts[name] = len(sent)
        assert all(cmd.startswith("EVALSHA") for cmd in sent), (name, sent)
    print("commands per transition:", counts)
    expected = dict.fromkeys(transitions, 1)
    expected["renew-many-3"] = 3  # three scripts pipelined: one round trip
    assert counts == expected
