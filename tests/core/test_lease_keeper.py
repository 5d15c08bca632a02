"""The per-process renewal thread: one round trip for every held lease, and fork safety."""

from __future__ import annotations

import multiprocessing
import time

from idemtask.lease import LeaseKeeper
from idemtask.store import Lease, RedisStore, Status


def _acquire(store: RedisStore, key: str, attempt: str, lease_ms: int) -> Lease:
    out = store.acquire(
        key,
        task_id="t",
        attempt_id=attempt,
        task_name="n",
        fingerprint="",
        lease_ms=lease_ms,
        max_deliveries=5,
        ttl_ms=60_000,
    )
    assert out.status is Status.ACQUIRED
    return Lease(key, attempt, out.token, lease_ms)


def test_one_round_trip_renews_every_held_lease(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    keeper = LeaseKeeper(store)
    leases = [_acquire(store, f"k{i}", f"a{i}", 300) for i in range(5)]
    lost: list[str] = []
    for lease in leases:
        keeper.hold(lease, lambda key=lease.key: lost.append(key))
    time.sleep(1.0)  # more than three leases long
    for lease in leases:
        out = store.acquire(
            lease.key,
            task_id="x",
            attempt_id="rival",
            task_name="n",
            fingerprint="",
            lease_ms=300,
            max_deliveries=5,
            ttl_ms=60_000,
        )
        assert out.status is Status.BUSY
    # every lease/3 = 100 ms one pipelined round trip for all five, not five.
    assert 5 <= keeper.renewals <= 14
    assert lost == []
    for lease in leases:
        keeper.drop(lease.attempt_id)
    assert keeper.held() == []


def test_a_taken_over_lease_is_reported_lost(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    keeper = LeaseKeeper(store)
    lease = _acquire(store, "k", "a1", 10_000)
    lost: list[str] = []
    keeper.hold(lease, lambda: lost.append("a1"))
    store.forget("k")  # an operator forgot the key and another attempt took it
    _acquire(store, "k", "a2", 10_000)
    keeper.renew_now()
    assert lost == ["a1"] and keeper.held() == []


def _child(url: str, queue: multiprocessing.Queue[object]) -> None:
    # Runs in a forked child that inherited a keeper holding a lease.
    keeper = _inherited
    store = keeper._store
    inherited = keeper.held()
    lease = _acquire(store, "child", "c1", 300)  # type: ignore[arg-type]
    keeper.hold(lease, lambda: None)
    time.sleep(0.8)
    busy = store.acquire(
        "child",
        task_id="x",
        attempt_id="rival",
        task_name="n",
        fingerprint="",
        lease_ms=300,
        max_deliveries=5,
        ttl_ms=60_000,
    )
    queue.put((len(inherited), keeper.renewals > 0, busy.status.value))


_inherited: LeaseKeeper


def test_forked_child_starts_its_own_keeper(redis_url: str) -> None:
    global _inherited
    store = RedisStore.from_url(redis_url)
    _inherited = LeaseKeeper(store)
    _inherited.hold(_acquire(store, "parent", "p1", 10_000), lambda: None)
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[object] = ctx.Queue()
    child = ctx.Process(target=_child, args=(redis_url, queue))
    child.start()
    inherited_count, renewed, rival = queue.get(timeout=30)  # type: ignore[misc]
    child.join(timeout=10)
    assert child.exitcode == 0
    # The child does not renew (or release) its parent's leases, and renews its own.
    assert (inherited_count, renewed, rival) == (0, True, "busy")
    assert [lease.key for lease in _inherited.held()] == ["parent"]
