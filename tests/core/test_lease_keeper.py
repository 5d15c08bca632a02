"""The per-process renewal thread: one round trip for every held lease, and fork safety."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from idemtask.lease import LeaseKeeper
from idemtask.store import Lease, RedisStore, Status

from servers import RedisServer


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


class CountingStore(RedisStore):
    """The real store, counting every renewal round trip it is asked for (failed ones too)."""

    attempts = 0

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        self.attempts += 1
        return super().renew_many(leases)


def _hold_and_watch(keeper: LeaseKeeper, lease: Lease) -> list[float]:
    """Hold ``lease``; the returned list gets the seconds from hold to the lease-lost call."""
    held_at = time.monotonic()
    lost: list[float] = []
    keeper.hold(lease, lambda: lost.append(time.monotonic() - held_at))
    return lost


def _lease_warnings(caplog: pytest.LogCaptureFixture, about: str = "") -> list[str]:
    """The keeper's log lines (those naming ``about``: keepers of other tests live on)."""
    lines = [r.getMessage() for r in caplog.records if r.name == "idemtask.lease"]
    return [line for line in lines if about in line]


def test_an_out_of_memory_store_does_not_kill_the_keeper_and_the_lease_is_lost_in_time(
    fresh_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Renewal writes; a store at maxmemory under noeviction answers OOM. The keeper backs
    off, marks the lease lost once a lease length passed without a renewal (another worker
    may take the key over from then on), and renews again when the store recovers."""
    caplog.set_level(logging.WARNING, logger="idemtask.lease")
    server = fresh_redis()
    store = CountingStore.from_url(server.url)
    keeper = LeaseKeeper(store)
    lost = _hold_and_watch(keeper, _acquire(store, "k", "a1", 1000))
    admin = server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    time.sleep(2.0)
    assert keeper._thread is not None and keeper._thread.is_alive()
    assert len(lost) == 1 and lost[0] >= 1.0  # lost, and not before its lease could end
    assert keeper.held() == []
    assert store.attempts < 60  # backed off: not a retry per millisecond
    warnings = _lease_warnings(caplog, "OOM")
    assert len(warnings) == 1, warnings  # one, not one per try
    admin.config_set("maxmemory", 0)
    # Over two lease lengths: only renewals keep it. The lease is long enough that a pause of
    # this process (a full garbage collection on a busy machine) cannot outlast it.
    later = _acquire(store, "k2", "a2", 900)
    renewals = keeper.renewals
    lost_later = _hold_and_watch(keeper, later)
    time.sleep(2.0)
    assert _rival(store, "k2") is Status.BUSY  # the same keeper renews again
    assert lost_later == [] and keeper.renewals - renewals >= 4
    assert any("recovered" in m for m in _lease_warnings(caplog))
    keeper.drop(later.attempt_id)


def test_refused_connections_are_retried_with_backoff_not_in_a_tight_loop(
    fresh_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="idemtask.lease")
    server = fresh_redis()
    store = CountingStore.from_url(server.url)
    keeper = LeaseKeeper(store)
    lost = _hold_and_watch(keeper, _acquire(store, "k", "a1", 1500))
    server.stop()
    time.sleep(2.0)
    assert keeper._thread is not None and keeper._thread.is_alive()
    assert len(lost) == 1 and lost[0] >= 1.5
    assert store.attempts < 60
    warnings = _lease_warnings(caplog, f":{server.port}")
    assert len(warnings) == 1, warnings


class BrokenForAWhile(RedisStore):
    """The real store, whose first renewals fail with an error that is no store failure
    (as a bug in idemtask would)."""

    broken = 3

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        if self.broken > 0:
            self.broken -= 1
            raise ValueError("unexpected reply shape")
        return super().renew_many(leases)


def test_an_unexpected_error_in_renewal_does_not_kill_the_keeper(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="idemtask.lease")
    store = BrokenForAWhile.from_url(redis_url)
    keeper = LeaseKeeper(store)
    lost = _hold_and_watch(keeper, _acquire(store, "k", "a1", 1500))
    time.sleep(2.0)
    assert keeper._thread is not None and keeper._thread.is_alive()
    assert store.broken == 0
    assert _rival(store, "k") is Status.BUSY  # renewed again after the errors
    assert lost == []
    failing = [r for r in caplog.records if r.name == "idemtask.lease" and r.exc_info]
    assert len(failing) == 1  # logged once, with its traceback
    keeper.drop("a1")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_keeper_thread_found_dead_is_started_again(redis_url: str) -> None:
    """Nothing the keeper can catch kills it; what it cannot (a callback raising
    SystemExit) is repaired the next time an attempt ends while others still hold."""
    store = RedisStore.from_url(redis_url)
    keeper = LeaseKeeper(store)
    kept = _acquire(store, "kept", "a-kept", 900)
    keeper.hold(kept, lambda: None)
    doomed = _acquire(store, "doomed", "a-doomed", 300)

    def exit_thread() -> None:
        raise SystemExit

    keeper.hold(doomed, exit_thread)
    store.forget("doomed")  # its next renewal finds it gone and calls exit_thread
    wait_until = time.monotonic() + 5
    while keeper._thread is not None and keeper._thread.is_alive():
        assert time.monotonic() < wait_until, "the callback did not end the thread"
        time.sleep(0.01)
    keeper.drop("an-attempt-that-ended")
    time.sleep(1.2)  # past the kept lease, which only a running keeper renews
    assert _rival(store, "kept") is Status.BUSY
    keeper.drop(kept.attempt_id)


def _rival(store: RedisStore, key: str) -> Status:
    out = store.acquire(
        key,
        task_id="x",
        attempt_id="rival",
        task_name="n",
        fingerprint="",
        lease_ms=300,
        max_deliveries=5,
        ttl_ms=60_000,
    )
    return out.status


class _CountingCondition(threading.Condition):
    """Counts how often the keeper thread comes back from waiting."""

    wakeups = 0

    def wait(self, timeout: float | None = None) -> bool:
        woke = super().wait(timeout)
        type(self).wakeups += 1
        return woke


def test_short_bodies_do_not_wake_the_keeper_per_task(redis_url: str) -> None:
    """A worker running bodies far shorter than a third of the lease drops each lease before
    it is due: the renewal thread must not be switched to once per task."""
    store = RedisStore.from_url(redis_url)
    keeper = LeaseKeeper(store)
    _CountingCondition.wakeups = 0
    keeper._cond = _CountingCondition()
    for i in range(1000):
        lease = _acquire(store, f"short{i}", f"a{i}", 30_000)
        keeper.hold(lease, lambda: None)
        keeper.drop(lease.attempt_id)  # a zero-length body: done before the keeper runs
        store.complete(
            lease.key,
            attempt_id=lease.attempt_id,
            token=lease.token,
            result=None,
            result_ttl_ms=60_000,
        )
    assert keeper.renewals == 0
    assert _CountingCondition.wakeups <= 5, _CountingCondition.wakeups
