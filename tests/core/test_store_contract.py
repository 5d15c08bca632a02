"""The store contract, run unchanged against MemoryStore and RedisStore on a real redis-server."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, get_args

import pytest

from idemtask.codecs import JsonCodec
from idemtask.store import (
    AcquireAnswer,
    Answer,
    CompleteAnswer,
    Lease,
    MemoryStore,
    RedisStore,
    ReleaseAnswer,
    ReserveAnswer,
    Stale,
    State,
    Status,
    Store,
)

LEASE_MS = 200
TTL_MS = 60_000


@pytest.fixture(params=["memory", "redis", "redis-client-path"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    url = request.getfixturevalue("redis_url")
    # redis-client-path: the scripts through redis-py's command path, as on a cluster.
    redis_store = RedisStore.from_url(url, lean_calls=request.param == "redis")
    yield redis_store
    redis_store.client.close()


def new_key() -> str:
    return uuid.uuid4().hex


def reserve(
    store: Store, key: str, task_id: str = "t1", fp: str = "fp", **kw: Any
) -> ReserveAnswer:
    options: dict[str, Any] = {"reservation_ms": 10_000, "ttl_ms": TTL_MS}
    options.update(kw)
    return store.reserve(key, task_id=task_id, task_name="shop.charge", fingerprint=fp, **options)


def acquire(
    store: Store, key: str, attempt: str = "a1", task_id: str = "t1", fp: str = "fp", **kw: Any
) -> AcquireAnswer:
    options: dict[str, Any] = {"lease_ms": LEASE_MS, "max_deliveries": 5, "ttl_ms": TTL_MS}
    options.update(kw)
    return store.acquire(
        key, task_id=task_id, attempt_id=attempt, task_name="shop.charge", fingerprint=fp, **options
    )


def complete(
    store: Store, key: str, attempt: str, token: int, data: bytes | None
) -> CompleteAnswer:
    return store.complete(key, attempt_id=attempt, token=token, result=data, result_ttl_ms=TTL_MS)


def release(
    store: Store, key: str, attempt: str, token: int, terminal: bool = False
) -> ReleaseAnswer:
    return store.release(
        key,
        attempt_id=attempt,
        token=token,
        error="ValueError: boom",
        terminal=terminal,
        ttl_ms=TTL_MS,
    )


def expire_lease() -> None:
    time.sleep(LEASE_MS / 1000 + 0.05)


# -- answers ------------------------------------------------------------------------------


def test_every_status_names_exactly_one_answer_type() -> None:
    answers = get_args(Answer)
    assert sorted(a.status.value for a in answers) == sorted(s.value for s in Status)


def test_the_old_single_answer_name_is_deprecated() -> None:
    import idemtask.store

    with pytest.warns(DeprecationWarning, match="Outcome is deprecated"):
        assert idemtask.store.Outcome is Answer


# -- reserve -------------------------------------------------------------------------------


def test_reserve_new_then_duplicate_names_the_original(store: Store) -> None:
    key = new_key()
    assert reserve(store, key, "t1").status is Status.NEW
    dup = reserve(store, key, "t2")
    assert (dup.status, dup.task_id, dup.state) == (Status.DUPLICATE, "t1", State.QUEUED)
    record = store.inspect(key)
    assert record is not None and record.state is State.QUEUED and record.task_id == "t1"


def test_reserve_again_after_the_reservation_expires(store: Store) -> None:
    key = new_key()
    assert reserve(store, key, "t1", reservation_ms=50).status is Status.NEW
    time.sleep(0.1)
    assert reserve(store, key, "t2").status is Status.NEW
    record = store.inspect(key)
    assert record is not None and record.task_id == "t2"


def test_reserve_on_running_done_and_failed_records(store: Store) -> None:
    running, done, failed = new_key(), new_key(), new_key()
    acquire(store, running, task_id="r1")
    out = reserve(store, running, "x")
    assert (out.status, out.task_id, out.state) == (Status.DUPLICATE, "r1", State.RUNNING)

    token = acquire(store, done, task_id="d1").token
    complete(store, done, "a1", token, b'{"ok":1}')
    out = reserve(store, done, "x")
    assert (out.status, out.task_id, out.state) == (Status.DUPLICATE, "d1", State.DONE)
    assert out.result is not None and out.result.data == b'{"ok":1}'

    token = acquire(store, failed, task_id="f1").token
    release(store, failed, "a1", token, terminal=True)
    out = reserve(store, failed, "x")
    assert (out.status, out.task_id, out.state) == (Status.DUPLICATE, "f1", State.FAILED)


def test_reserve_over_an_expired_lease_is_new(store: Store) -> None:
    key = new_key()
    acquire(store, key, task_id="r1")
    expire_lease()
    assert reserve(store, key, "t2").status is Status.NEW


def test_cancel_gives_back_only_our_reservation(store: Store) -> None:
    key = new_key()
    reserve(store, key, "t1")
    assert store.cancel(key, task_id="other") == Stale("t1", State.QUEUED)
    assert store.cancel(key, task_id="t1").status is Status.RELEASED
    record = store.inspect(key)
    assert record is not None and record.state is State.IDLE
    assert reserve(store, key, "t2").status is Status.NEW


def test_fingerprint_conflict_on_reserve_and_acquire(store: Store) -> None:
    key = new_key()
    reserve(store, key, "t1", fp="fp-a")
    out = reserve(store, key, "t2", fp="fp-b")
    assert (out.status, out.task_id) == (Status.CONFLICT, "t1")
    assert acquire(store, key, task_id="t2", fp="fp-b").status is Status.CONFLICT
    # An empty fingerprint means "do not validate".
    assert reserve(store, key, "t3", fp="").status is Status.DUPLICATE
    assert acquire(store, key, task_id="t1", fp="fp-a").status is Status.ACQUIRED


# -- acquire -------------------------------------------------------------------------------


def test_acquire_then_busy_with_the_lease_left(store: Store) -> None:
    key = new_key()
    first = acquire(store, key, "a1", task_id="t1")
    assert (first.status, first.token, first.takeover) == (Status.ACQUIRED, 1, False)
    busy = acquire(store, key, "a2", task_id="t1")  # same task id: a redelivered copy
    assert busy.status is Status.BUSY and busy.task_id == "t1"
    assert 0 < busy.lease_left_ms <= LEASE_MS


def test_acquire_a_queued_record_takes_the_lease(store: Store) -> None:
    key = new_key()
    reserve(store, key, "t1")
    out = acquire(store, key, "a1", task_id="t1")
    assert out.status is Status.ACQUIRED and out.token == 1
    record = store.inspect(key)
    assert record is not None and record.state is State.RUNNING and record.holder == "a1"


def test_done_and_failed_are_replayed(store: Store) -> None:
    done, failed = new_key(), new_key()
    token = acquire(store, done, task_id="t1").token
    assert complete(store, done, "a1", token, b"42").status is Status.COMPLETED
    out = acquire(store, done, "a2", task_id="t2")
    assert out.status is Status.DONE and out.task_id == "t1"
    assert out.result is not None and out.result.data == b"42"

    token = acquire(store, failed, task_id="t1").token
    assert release(store, failed, "a1", token, terminal=True).status is Status.RELEASED
    out = acquire(store, failed, "a2", task_id="t2")
    assert out.status is Status.FAILED and out.error == "ValueError: boom"


@pytest.mark.parametrize("value", [None, 0, "", [], {}, False, 0.5, "héllo"])
def test_falsy_and_empty_results_replay_exactly(store: Store, value: Any) -> None:
    key, codec = new_key(), JsonCodec()
    token = acquire(store, key).token
    complete(store, key, "a1", token, codec.encode(value))
    out = acquire(store, key, "a2")
    assert out.status is Status.DONE and out.result is not None
    replayed = codec.decode(out.result.data)
    assert replayed == value and type(replayed) is type(value)


def test_done_without_a_stored_result_is_distinct_from_none(store: Store) -> None:
    key = new_key()
    token = acquire(store, key).token
    complete(store, key, "a1", token, None)
    out = acquire(store, key, "a2")
    assert out.status is Status.DONE and out.result is None


def test_takeover_after_the_lease_expires(store: Store) -> None:
    key = new_key()
    assert acquire(store, key, "a1").token == 1
    expire_lease()
    out = acquire(store, key, "a2", task_id="t2")
    assert (out.status, out.token, out.takeover) == (Status.ACQUIRED, 2, True)


def test_fencing_token_strictly_increases(store: Store) -> None:
    key = new_key()
    tokens = []
    for i in range(3):
        out = acquire(store, key, f"a{i}")
        tokens.append(out.token)
        release(store, key, f"a{i}", out.token)
    out = acquire(store, key, "a3")
    tokens.append(out.token)
    expire_lease()
    tokens.append(acquire(store, key, "a4").token)
    assert tokens == sorted(set(tokens)) and len(tokens) == 5


def test_stale_holder_cannot_renew_complete_or_release(store: Store) -> None:
    key = new_key()
    old = acquire(store, key, "a1")
    expire_lease()
    new = acquire(store, key, "a2")
    before = store.inspect(key)
    assert store.renew(Lease(key, "a1", old.token, LEASE_MS)) is False
    stale = complete(store, key, "a1", old.token, b"1")
    assert (stale.status, stale.state) == (Status.STALE, State.RUNNING)
    assert release(store, key, "a1", old.token).status is Status.STALE
    # Right attempt id with the wrong token is stale too.
    assert complete(store, key, "a2", old.token, b"1").status is Status.STALE
    after = store.inspect(key)
    assert before is not None and after is not None
    assert (after.state, after.holder, after.token, after.result, after.updated_ms) == (
        before.state,
        before.holder,
        before.token,
        before.result,
        before.updated_ms,
    )
    assert complete(store, key, "a2", new.token, b"2").status is Status.COMPLETED


def test_stale_completion_reports_the_recorded_result(store: Store) -> None:
    key = new_key()
    old = acquire(store, key, "a1")
    expire_lease()
    new = acquire(store, key, "a2")
    complete(store, key, "a2", new.token, b'"winner"')
    stale = complete(store, key, "a1", old.token, b'"loser"')
    assert stale.status is Status.STALE and stale.state is State.DONE
    assert stale.result is not None and stale.result.data == b'"winner"'


def test_renew_many_extends_only_held_leases(store: Store) -> None:
    held, other = new_key(), new_key()
    a = acquire(store, held, "a1")
    acquire(store, other, "b1")
    time.sleep(LEASE_MS / 2000)
    answers = store.renew_many(
        [Lease(held, "a1", a.token, LEASE_MS), Lease(other, "not-me", 1, LEASE_MS)]
    )
    assert answers == [True, False]
    time.sleep(LEASE_MS / 2000 + 0.03)  # past the original lease, inside the renewed one
    assert acquire(store, held, "x").status is Status.BUSY
    assert acquire(store, other, "y").status is Status.ACQUIRED


def test_poison_after_the_delivery_cap(store: Store) -> None:
    key = new_key()
    for i in range(2):
        out = acquire(store, key, f"a{i}", max_deliveries=2)
        assert out.status is Status.ACQUIRED and out.deliveries == i + 1
        expire_lease()  # the holder "crashed": nobody reported back
    out = acquire(store, key, "a2", max_deliveries=2)
    assert out.status is Status.POISONED and out.deliveries == 2
    record = store.inspect(key)
    assert record is not None and record.state is State.FAILED and "poison" in record.error
    assert acquire(store, key, "a3", max_deliveries=2).status is Status.FAILED


def _run_long_then_crash(store: Store, key: str, attempt: str, ttl_ms: int) -> AcquireAnswer:
    """Take the key, renew it for longer than ``ttl_ms - LEASE_MS``, then stop renewing
    (the worker died) and wait until the lease is over."""
    out = acquire(store, key, attempt, ttl_ms=ttl_ms, max_deliveries=2)
    assert out.status is Status.ACQUIRED
    run_until = time.monotonic() + ttl_ms / 1000 + 0.2
    while time.monotonic() < run_until:
        time.sleep(LEASE_MS / 4000)
        assert store.renew(Lease(key, attempt, out.token, LEASE_MS)) is True
    expire_lease()
    return out


def test_a_long_run_that_stops_renewing_keeps_its_token_and_delivery_count(store: Store) -> None:
    key, ttl_ms = new_key(), 2 * LEASE_MS
    first = _run_long_then_crash(store, key, "a1", ttl_ms)
    second = _run_long_then_crash(store, key, "a2", ttl_ms)
    # The record outlived both leases: the token went up and both crashes were counted.
    assert (second.token, second.takeover, second.deliveries) == (first.token + 1, True, 2)
    out = acquire(store, key, "a3", ttl_ms=ttl_ms, max_deliveries=2)
    assert out.status is Status.POISONED and out.deliveries == 2


def test_a_result_ttl_equal_to_the_lease_outlives_the_lease(store: Store) -> None:
    key = new_key()
    first = acquire(store, key, "a1", ttl_ms=LEASE_MS)
    expire_lease()
    out = acquire(store, key, "a2", ttl_ms=LEASE_MS)
    assert (out.status, out.token, out.takeover, out.deliveries) == (
        Status.ACQUIRED,
        first.token + 1,
        True,
        2,
    )


def test_a_running_record_outlives_its_lease_by_the_result_ttl(store: Store) -> None:
    key = new_key()
    acquire(store, key, "a1", ttl_ms=5_000)
    assert store.renew(Lease(key, "a1", 1, LEASE_MS)) is True
    record = store.inspect(key)
    # lease time left (at most LEASE_MS) + the result TTL; a renewal never lowers it.
    assert record is not None and record.ttl_ms > 5_000


def test_release_to_idle_resets_the_delivery_count(store: Store) -> None:
    key = new_key()
    for i in range(4):
        out = acquire(store, key, f"a{i}", max_deliveries=2)
        assert out.status is Status.ACQUIRED and out.deliveries == 1
        release(store, key, f"a{i}", out.token)


def test_every_record_has_a_ttl(store: Store) -> None:
    key = new_key()
    reserve(store, key, "t1", ttl_ms=5_000)
    steps: list[Callable[[], object]] = [
        lambda: acquire(store, key, "a1", task_id="t1", ttl_ms=5_000),
        lambda: store.renew(Lease(key, "a1", 1, LEASE_MS)),
        lambda: store.complete(key, attempt_id="a1", token=1, result=b"1", result_ttl_ms=7_000),
    ]
    record = store.inspect(key)
    assert record is not None and 0 < record.ttl_ms <= 10_000
    for step in steps:
        step()
        record = store.inspect(key)
        assert record is not None and 0 < record.ttl_ms <= 10_000
    assert record.ttl_ms > 5_000  # the result TTL applies once done


def test_forget_and_scan(store: Store) -> None:
    keys = [new_key() for _ in range(3)]
    for key in keys:
        reserve(store, key)
    assert {r.key for r in store.scan(batch=1)} >= set(keys)
    assert store.forget(keys[0]) is True
    assert store.forget(keys[0]) is False
    assert store.inspect(keys[0]) is None
    assert reserve(store, keys[0]).status is Status.NEW


def test_sixteen_threads_one_key_exactly_one_acquires(store: Store) -> None:
    """Sixteen threads, released together by a barrier, acquire one fresh key per round.

    The threads live through all 200 rounds (the barrier keeps the rounds apart: none
    starts round n + 1 before all have answered round n), so each keeps its own connection
    instead of opening one per round, which over TLS made this test take minutes.
    """
    rounds, contenders = 200, 16
    keys = [new_key() for _ in range(rounds)]
    barrier = threading.Barrier(contenders)
    statuses: list[list[Status]] = [[] for _ in range(rounds)]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def contend(i: int) -> None:
        try:
            for n, key in enumerate(keys):
                barrier.wait()
                out = acquire(store, key, f"a{i}", lease_ms=10_000)
                with lock:
                    statuses[n].append(out.status)
        except BaseException as exc:  # the others must not wait for it at the barrier
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for answered in statuses:
        assert answered.count(Status.ACQUIRED) == 1
        assert answered.count(Status.BUSY) == 15


# -- steps (idemtask.step) -----------------------------------------------------------------


def record_step(store: Store, key: str, attempt: str, token: int, name: str, data: bytes) -> Status:
    return store.record_step(key, attempt_id=attempt, token=token, name=name, value=data).status


def test_only_the_holder_records_and_reads_steps(store: Store) -> None:
    key = new_key()
    held = acquire(store, key, "a1")
    assert record_step(store, key, "a1", held.token, "reserve", b'{"n":1}') is Status.RECORDED
    assert record_step(store, key, "a1", held.token, "empty", b"") is Status.RECORDED
    assert record_step(store, key, "a2", held.token, "x", b"1") is Status.STALE  # other attempt
    assert record_step(store, key, "a1", held.token + 1, "x", b"1") is Status.STALE  # token
    read = store.recorded_steps(key, attempt_id="a1", token=held.token)
    assert read.status is Status.HELD
    assert dict(read.steps) == {"reserve": b'{"n":1}', "empty": b""}
    stale = store.recorded_steps(key, attempt_id="a2", token=held.token)
    assert stale == Stale("t1", State.RUNNING)  # a Stale carries no steps


def test_a_takeover_reads_the_steps_and_fences_the_old_holder(store: Store) -> None:
    key = new_key()
    first = acquire(store, key, "a1")
    assert record_step(store, key, "a1", first.token, "charge", b"\x00\xffch") is Status.RECORDED
    expire_lease()
    second = acquire(store, key, "a2")
    assert second.takeover and second.token == first.token + 1
    assert record_step(store, key, "a1", first.token, "ship", b"late") is Status.STALE
    read = store.recorded_steps(key, attempt_id="a2", token=second.token)
    assert dict(read.steps) == {"charge": b"\x00\xffch"}  # the stale write left nothing
    assert store.recorded_steps(key, attempt_id="a1", token=first.token).status is Status.STALE


def test_steps_outlive_a_release_for_another_try(store: Store) -> None:
    key = new_key()
    first = acquire(store, key, "a1")
    record_step(store, key, "a1", first.token, "one", b"1")
    assert release(store, key, "a1", first.token).status is Status.RELEASED
    assert record_step(store, key, "a1", first.token, "two", b"2") is Status.STALE  # idle now
    retry = acquire(store, key, "a2")
    read = store.recorded_steps(key, attempt_id="a2", token=retry.token)
    assert dict(read.steps) == {"one": b"1"}


def test_steps_are_inspected_with_the_record_and_forgotten_with_it(store: Store) -> None:
    key = new_key()
    held = acquire(store, key, "a1")
    record_step(store, key, "a1", held.token, "p:odd:name", b"[1]")
    record = store.inspect(key)
    assert record is not None and dict(record.steps) == {"p:odd:name": b"[1]"}
    assert complete(store, key, "a1", held.token, b"7").status is Status.COMPLETED
    assert record_step(store, key, "a1", held.token, "after", b"1") is Status.STALE  # done
    done = store.inspect(key)
    assert done is not None and dict(done.steps) == {"p:odd:name": b"[1]"}
    assert done.result is not None and done.result.data == b"7"
    assert store.forget(key)
    again = acquire(store, key, "a2")
    assert again.token == 1  # a new record: it cannot see the old one's steps
    assert not store.recorded_steps(key, attempt_id="a2", token=1).steps


def test_steps_of_an_absent_record_are_stale(store: Store) -> None:
    key = new_key()
    assert record_step(store, key, "a1", 1, "x", b"1") is Status.STALE
    assert store.recorded_steps(key, attempt_id="a1", token=1).status is Status.STALE
    assert store.inspect(key) is None  # a stale write creates nothing
