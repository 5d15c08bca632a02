"""A store-level workload (acquire then complete, over fresh keys, from several threads) and
the bookkeeping the failover tests assert on."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from idemtask.errors import StoreUnavailable
from idemtask.store import Lease, RedisStore, State, Status

LEASE_MS = 2_000
TTL_MS = 600_000
ACQUIRE: dict[str, Any] = {
    "task_name": "shop.charge",
    "fingerprint": "fp",
    "lease_ms": LEASE_MS,
    "max_deliveries": 5,
    "ttl_ms": TTL_MS,
}


@dataclass
class Tally:
    """What one group of workers saw."""

    name: str
    ok: Counter[str] = field(default_factory=Counter)  # op -> calls that answered
    unavailable: Counter[str] = field(default_factory=Counter)  # op -> StoreUnavailable
    unexpected: list[str] = field(default_factory=list)  # anything else: a wrong answer
    completed: list[str] = field(default_factory=list)  # keys whose complete said COMPLETED
    stale: list[str] = field(default_factory=list)  # complete said STALE (acquire lost)
    unavailable_at: list[float] = field(default_factory=list)  # monotonic times
    complete_ms: list[float] = field(default_factory=list)
    slowest_s: float = 0.0  # the longest acquire or complete that answered
    lock: threading.Lock = field(default_factory=threading.Lock)

    def noticed(self, failover_s: float) -> bool:
        """Whether the fault reached these workers: a call raised ``StoreUnavailable``, or
        one answered only once the failover was over (a client that retries through it,
        as redis-py 8.2's cluster client does)."""
        return sum(self.unavailable.values()) > 0 or self.slowest_s >= failover_s / 2

    def outage(self) -> float:
        """Seconds between the first and last StoreUnavailable (0 if none)."""
        if not self.unavailable_at:
            return 0.0
        return max(self.unavailable_at) - min(self.unavailable_at)


def result_for(key: str) -> bytes:
    return f"result-of-{key}".encode()


def worker(store: RedisStore, tally: Tally, stop: threading.Event, tag: str) -> None:
    """acquire -> complete on fresh keys until ``stop``; records every answer."""
    while not stop.is_set():
        key = f"{tag}-{uuid.uuid4().hex}"
        began = time.perf_counter()
        try:
            out = store.acquire(key, task_id="t", attempt_id="a", **ACQUIRE)
        except StoreUnavailable:
            _unavailable(tally, "acquire")
            continue
        except Exception as exc:
            _unexpected(tally, f"acquire raised {exc!r}")
            continue
        if out.status is not Status.ACQUIRED or out.token != 1:
            _unexpected(tally, f"acquire on a fresh key answered {out}")
            continue
        _ok(tally, "acquire", time.perf_counter() - began)
        began = time.perf_counter()
        try:
            done = store.complete(
                key, attempt_id="a", token=1, result=result_for(key), result_ttl_ms=TTL_MS
            )
        except StoreUnavailable:
            _unavailable(tally, "complete")
            continue
        except Exception as exc:
            _unexpected(tally, f"complete raised {exc!r}")
            continue
        elapsed_ms = (time.perf_counter() - began) * 1000
        with tally.lock:
            tally.ok["complete"] += 1
            tally.complete_ms.append(elapsed_ms)
            tally.slowest_s = max(tally.slowest_s, elapsed_ms / 1000)
            if done.status is Status.COMPLETED:
                tally.completed.append(key)
            elif done.status is Status.STALE and done.state is None:
                tally.stale.append(key)  # the record (and our lease) was lost in failover
            else:
                tally.unexpected.append(f"complete answered {done}")


def _ok(tally: Tally, op: str, seconds: float) -> None:
    with tally.lock:
        tally.ok[op] += 1
        tally.slowest_s = max(tally.slowest_s, seconds)


def _unavailable(tally: Tally, op: str) -> None:
    with tally.lock:
        tally.unavailable[op] += 1
        tally.unavailable_at.append(time.monotonic())
    time.sleep(0.02)


def _unexpected(tally: Tally, what: str) -> None:
    with tally.lock:
        tally.unexpected.append(what)


@dataclass
class Survival:
    """Where each COMPLETED key stands after the failover."""

    kept: int = 0
    lost_absent: int = 0  # no record: the next acquire is a fresh ACQUIRED
    lost_running: int = 0  # back to running: taken over once the lease ends
    wrong: list[str] = field(default_factory=list)
    lost_keys: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.lost_absent + self.lost_running


def check_survival(store: RedisStore, keys: list[str]) -> Survival:
    """Inspect every key that was COMPLETED; a done record must carry its own result."""
    survival = Survival()
    for key in keys:
        record = store.inspect(key)
        if record is None:
            survival.lost_absent += 1
            survival.lost_keys.append(key)
        elif record.state is State.DONE:
            if record.result is None or record.result.data != result_for(key):
                survival.wrong.append(f"{key}: {record}")
            else:
                survival.kept += 1
        elif record.state is State.RUNNING:
            survival.lost_running += 1
            survival.lost_keys.append(key)
        else:
            survival.wrong.append(f"{key}: {record}")
    return survival


def run_groups(
    groups: dict[str, RedisStore],
    threads_per_group: int,
    fault: Callable[[], float],
    *,
    warmup: float = 1.0,
    after: float = 1.5,
) -> tuple[dict[str, Tally], float]:
    """Run every group's workers, call ``fault`` (it returns the failover time) after
    ``warmup`` seconds, keep going ``after`` seconds more, then stop."""
    stop = threading.Event()
    tallies = {name: Tally(name) for name in groups}
    threads = [
        threading.Thread(target=worker, args=(store, tallies[name], stop, f"{name}{i}"))
        for name, store in groups.items()
        for i in range(threads_per_group)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(warmup)
        failover_s = fault()
        time.sleep(after)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return tallies, failover_s


def exercise_every_operation(store: RedisStore, key: str) -> None:
    """Each transition and admin call once on ``key``; all must answer correctly."""
    reserve: dict[str, Any] = {"task_name": "n", "fingerprint": "fp", "ttl_ms": TTL_MS}
    assert store.reserve(key, task_id="t", reservation_ms=10_000, **reserve).status is Status.NEW
    assert store.cancel(key, task_id="t").status is Status.RELEASED
    out = store.acquire(key, task_id="t", attempt_id="a", **ACQUIRE)
    assert out.status is Status.ACQUIRED
    assert store.renew(Lease(key, "a", out.token, LEASE_MS)) is True
    assert store.renew_many([Lease(key, "a", out.token, LEASE_MS)]) == [True]
    released = store.release(key, attempt_id="a", token=out.token, error="e", terminal=False,
                             ttl_ms=TTL_MS)  # fmt: skip
    assert released.status is Status.RELEASED
    again = store.acquire(key, task_id="t", attempt_id="b", **ACQUIRE)
    assert again.status is Status.ACQUIRED and again.token == out.token + 1
    done = store.complete(
        key, attempt_id="b", token=again.token, result=b"ok", result_ttl_ms=TTL_MS
    )
    assert done.status is Status.COMPLETED
    record = store.inspect(key)
    assert record is not None and record.state is State.DONE
    assert any(r.key == key for r in store.scan(batch=100))
    assert store.forget(key) is True
    store.ping()
