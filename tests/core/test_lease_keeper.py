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


def test_a_worker_taking_task_after_task_does_not_wake_the_keeper_each_time(
    redis_url: str,
) -> None:
    """Waking the renewal thread costs a thread switch: a lease as long as the ones before
    it is never due sooner than the keeper's next wake-up, so holding it must not notify."""
    store = RedisStore.from_url(redis_url)
    keeper = LeaseKeeper(store)
    notified: list[int] = []
    cond = keeper._cond
    real_notify = cond.notify

    def notify(n: int = 1) -> None:
        notified.append(n)
        real_notify(n)

    cond.notify = notify  # type: ignore[method-assign]
    for i in range(50):
        lease = Lease(f"k{i}", f"a{i}", 1, 60_000)
        keeper.hold(lease, lambda: None)
        time.sleep(0.002)  # the keeper gets to run and settle into its wait
        keeper.drop(lease.attempt_id)
    assert len(notified) <= 2


def test_a_shorter_lease_held_later_is_still_renewed_in_time(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    keeper = LeaseKeeper(store)
    long = _acquire(store, "long", "a-long", 60_000)
    keeper.hold(long, lambda: None)
    time.sleep(0.05)  # the keeper now waits ~20 s for the long lease
    short = _acquire(store, "short", "a-short", 300)
    lost: list[str] = []
    keeper.hold(short, lambda: lost.append("short"))
    time.sleep(1.0)
    out = store.acquire(
        "short",
        task_id="x",
        attempt_id="rival",
        task_name="n",
        fingerprint="",
        lease_ms=300,
        max_deliveries=5,
        ttl_ms=60_000,
    )
    assert out.status is Status.BUSY
    assert lost == []
    assert keeper.renewals >= 3
