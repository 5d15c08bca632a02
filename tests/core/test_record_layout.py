"""The record's layout in Redis: what a finished record keeps, and records written by the
layout before the compact one (a running record of an older worker, a done record with the
has-result flag ``x``, text task id and fingerprint) read and finish the same way."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from idemtask.store import RedisStore, State, Status

TASK = "shop.tasks.charge_order"
TTL_MS = 60_000
OPTIONS: dict[str, Any] = {"lease_ms": 10_000, "max_deliveries": 5, "ttl_ms": TTL_MS}


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    redis_store = RedisStore.from_url(redis_url)
    yield redis_store
    redis_store.client.close()


def server_ms(store: RedisStore) -> int:
    seconds, micros = store.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def fields(store: RedisStore, key: str) -> dict[str, bytes]:
    raw = store.client.hgetall(store.record_name(key))
    return {name.decode(): value for name, value in raw.items()}


def old_record(store: RedisStore, key: str, **values: Any) -> None:
    """Write a record as the previous layout did: every field, text forms only."""
    name = store.record_name(key)
    store.client.hset(name, mapping=values)
    store.client.pexpire(name, TTL_MS)


def acquire(store: RedisStore, key: str, task_id: str, fingerprint: str, attempt: str = "b") -> Any:
    return store.acquire(
        key,
        task_id=task_id,
        attempt_id=attempt,
        task_name=TASK,
        fingerprint=fingerprint,
        **OPTIONS,
    )


def reserve(store: RedisStore, key: str, task_id: str, fingerprint: str) -> Any:
    return store.reserve(
        key,
        task_id=task_id,
        task_name=TASK,
        fingerprint=fingerprint,
        reservation_ms=10_000,
        ttl_ms=TTL_MS,
    )


def test_a_finished_record_keeps_only_what_its_answers_need(store: RedisStore) -> None:
    key, task_id, fingerprint = uuid.uuid4().hex, str(uuid.uuid4()), uuid.uuid4().hex
    reserve(store, key, task_id, fingerprint)
    held = acquire(store, key, task_id, fingerprint, attempt="a")
    store.complete(key, attempt_id="a", token=held.token, result=b"4990", result_ttl_ms=TTL_MS)

    stored = fields(store, key)
    assert set(stored) == {"s", "T", "F", "n", "k", "u", "r"}
    assert stored["T"] == uuid.UUID(task_id).bytes and stored["F"] == bytes.fromhex(fingerprint)
    assert store.client.object("encoding", store.record_name(key)) == b"listpack"
    record = store.inspect(key)
    assert record is not None
    assert (record.state, record.task_id, record.fingerprint) == (State.DONE, task_id, fingerprint)
    assert (record.token, record.holder, record.deliveries, record.created_ms) == (1, "", 0, 0)
    assert record.updated_ms > 0 and record.result is not None and record.result.data == b"4990"
    # Every answer unpacks them: the task id replays, another fingerprint is a conflict.
    replay = acquire(store, key, str(uuid.uuid4()), fingerprint)
    assert (replay.status, replay.task_id, replay.result.data) == (Status.DONE, task_id, b"4990")
    duplicate = reserve(store, key, str(uuid.uuid4()), "")
    assert (duplicate.status, duplicate.task_id) == (Status.DUPLICATE, task_id)
    assert reserve(store, key, "x", uuid.uuid4().hex).status is Status.CONFLICT
    stale = store.complete(key, attempt_id="a", token=1, result=b"1", result_ttl_ms=TTL_MS)
    assert (stale.status, stale.task_id, stale.result.data) == (Status.STALE, task_id, b"4990")


@pytest.mark.parametrize(
    ("task_id", "fingerprint"),
    [
        ("order-7", "fp-a"),  # neither has the packed shape
        # packing would lose the case (fixed ids: test ids are the same in every process)
        ("74400E1E-5B51-4775-8EBE-2D0E425EC001", "40C0FEF116F7468BAF74A2EDFF29B1A7"),
        ("562f0b33-ef38-4798-aee3-f4d1bb1c4d40", "abc"),  # an odd number of hex digits
    ],
)
def test_ids_of_another_shape_stay_text(store: RedisStore, task_id: str, fingerprint: str) -> None:
    key = uuid.uuid4().hex
    held = acquire(store, key, task_id, fingerprint, attempt="a")
    store.release(key, attempt_id="a", token=held.token, error="E", terminal=True, ttl_ms=TTL_MS)
    stored = fields(store, key)
    assert "F" not in stored and stored["f"] == fingerprint.encode()
    record = store.inspect(key)
    assert record is not None
    assert (record.state, record.task_id) == (State.FAILED, task_id)
    assert record.fingerprint == fingerprint
    again = acquire(store, key, "other", fingerprint)
    assert (again.status, again.task_id, again.error) == (Status.FAILED, task_id, "E")
    assert acquire(store, key, "other", "fp-b").status is Status.CONFLICT


def test_a_running_record_of_the_old_layout_completes(store: RedisStore) -> None:
    key, task_id, fingerprint = uuid.uuid4().hex, str(uuid.uuid4()), uuid.uuid4().hex
    now = server_ms(store)
    old_record(
        store,
        key,
        s="running",
        t=task_id,
        f=fingerprint,
        n=TASK,
        h="a",
        k=3,
        l=now + 30_000,
        d=1,
        c=now - 5000,
        u=now - 10,
        g=TTL_MS,
    )
    record = store.inspect(key)
    assert record is not None
    assert (record.state, record.task_id, record.holder, record.token) == (
        State.RUNNING,
        task_id,
        "a",
        3,
    )
    assert (record.fingerprint, record.deliveries) == (fingerprint, 1)
    assert record.created_ms == now - 5000
    assert acquire(store, key, task_id, fingerprint).status is Status.BUSY

    done = store.complete(key, attempt_id="a", token=3, result=b'{"ok": 1}', result_ttl_ms=TTL_MS)
    assert (done.status, done.task_id) == (Status.COMPLETED, task_id)
    assert set(fields(store, key)) == {"s", "T", "F", "n", "k", "u", "r"}
    replay = acquire(store, key, str(uuid.uuid4()), fingerprint)
    assert (replay.status, replay.task_id, replay.result.data) == (
        Status.DONE,
        task_id,
        b'{"ok": 1}',
    )
    duplicate = reserve(store, key, str(uuid.uuid4()), fingerprint)
    assert (duplicate.status, duplicate.task_id, duplicate.result.data) == (
        Status.DUPLICATE,
        task_id,
        b'{"ok": 1}',
    )
    record = store.inspect(key)
    assert record is not None and (record.state, record.token) == (State.DONE, 3)


def test_an_expired_running_record_of_the_old_layout_is_taken_over(store: RedisStore) -> None:
    key, task_id, fingerprint = uuid.uuid4().hex, str(uuid.uuid4()), uuid.uuid4().hex
    now = server_ms(store)
    old_record(
        store,
        key,
        s="running",
        t=task_id,
        f=fingerprint,
        n=TASK,
        h="a",
        k=3,
        l=now - 1000,
        d=1,
        c=now - 5000,
        u=now - 5000,
        g=TTL_MS,
    )
    assert acquire(store, key, task_id, uuid.uuid4().hex).status is Status.CONFLICT
    taken = acquire(store, key, task_id, fingerprint, attempt="b")
    assert (taken.status, taken.token, taken.takeover, taken.deliveries) == (
        Status.ACQUIRED,
        4,
        True,
        2,
    )
    late = store.complete(key, attempt_id="a", token=3, result=b"1", result_ttl_ms=TTL_MS)
    assert late.status is Status.STALE and late.state is State.RUNNING
    done = store.complete(key, attempt_id="b", token=4, result=None, result_ttl_ms=TTL_MS)
    assert done.status is Status.COMPLETED
    replay = acquire(store, key, task_id, fingerprint, attempt="c")
    assert (replay.status, replay.result) == (Status.DONE, None)


@pytest.mark.parametrize(
    ("flag", "result"),
    [("1", b"null"), ("1", b""), ("0", None)],
)
def test_a_done_record_of_the_old_layout_replays(
    store: RedisStore, flag: str, result: bytes | None
) -> None:
    key, task_id, fingerprint = uuid.uuid4().hex, str(uuid.uuid4()), uuid.uuid4().hex
    now = server_ms(store)
    values: dict[str, Any] = {
        "s": "done",
        "t": task_id,
        "f": fingerprint,
        "n": TASK,
        "k": 2,
        "l": 0,
        "d": 0,
        "x": flag,
        "c": now - 5000,
        "u": now - 100,
        "g": TTL_MS,
    }
    if result is not None:
        values["r"] = result
    old_record(store, key, **values)

    record = store.inspect(key)
    assert record is not None
    assert (record.state, record.task_id, record.fingerprint, record.token) == (
        State.DONE,
        task_id,
        fingerprint,
        2,
    )
    assert (record.created_ms, record.updated_ms) == (now - 5000, now - 100)
    assert (record.result.data if record.result else None) == result
    replay = acquire(store, key, str(uuid.uuid4()), fingerprint)
    assert (replay.status, replay.task_id) == (Status.DONE, task_id)
    assert (replay.result.data if replay.result else None) == result
    duplicate = reserve(store, key, str(uuid.uuid4()), fingerprint)
    assert (duplicate.status, duplicate.task_id, duplicate.state) == (
        Status.DUPLICATE,
        task_id,
        State.DONE,
    )
    assert (duplicate.result.data if duplicate.result else None) == result
    stale = store.complete(key, attempt_id="a", token=2, result=b"9", result_ttl_ms=TTL_MS)
    assert stale.status is Status.STALE
    assert (stale.result.data if stale.result else None) == result
    assert reserve(store, key, "x", uuid.uuid4().hex).status is Status.CONFLICT
    assert fields(store, key) == {
        name: str(value).encode() if not isinstance(value, bytes) else value
        for name, value in values.items()
    }  # read, never rewritten
