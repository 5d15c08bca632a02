"""Celery API paths under real prefork workers: forwarded headers, ``replace()``,
``retry(throw=False)``, a result the serializer cannot encode, one over ``max_result_bytes``
and a message that expired before it ran. An idempotent task behaves
as a plain one except for deduplication and replay."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
import redis
from celery import Celery
from celery_support import wait_for
from celery_testapp import decisions

from idemtask.errors import TaskFailedError
from idemtask.store.base import State

pytestmark = [pytest.mark.celery, pytest.mark.slow]


def runs(counter: redis.Redis, name: str) -> int:
    return int(counter.get(f"runs:{name}") or 0)


def test_forwarded_headers_do_not_make_the_child_a_duplicate(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    app = make_app()
    forwarding = app.tasks["t.forwarding"]
    worker_process()
    parent = forwarding.delay("fw")
    child_id, named_id = parent.get(timeout=30)
    assert parent.id not in (child_id, named_id)
    # Through apply_async and through send_task by name (checked by the worker alone).
    assert app.AsyncResult(child_id).get(timeout=30) == {"token": "fw-child", "done": 1}
    assert app.AsyncResult(named_id).get(timeout=30) == {"token": "fw-named", "done": 1}
    assert runs(counter, "fw-child") == 1
    assert runs(counter, "fw-named") == 1
    assert runs(counter, "forwarding:fw") == 1


def test_replace_hands_the_key_to_the_replacement(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    app = make_app()
    replaced = app.tasks["t.replaced"]
    key = replaced.idemtask_key(("rp",)).key
    worker_process()
    first = replaced.delay("rp")
    assert first.get(timeout=30) == {"token": "rp-r", "done": 1}
    stored = replaced._guard().store.inspect(key)
    assert stored is not None and stored.state is State.DONE  # not idle
    # A duplicate call gets the original handle; a message by name replays the same answer.
    assert replaced.delay("rp").id == first.id
    again = app.send_task("t.replaced", args=("rp",))
    assert again.get(timeout=30) == {"token": "rp-r", "done": 1}
    assert runs(counter, "replaced:rp") == 1
    assert runs(counter, "rp-r") == 1


def test_retry_without_throw_never_runs_two_bodies_at_once(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    app = make_app()
    soft_retry = app.tasks["t.soft_retry"]
    key = soft_retry.idemtask_key(("soft",)).key
    worker_process()
    result = soft_retry.delay("soft")
    wait_for(
        lambda: counter.get("overlap:soft") or decisions(counter, key).get("replayed"),
        30,
        "the retry's delivery",
    )
    seen = decisions(counter, key)
    print(f"\nretry(throw=False): body runs={runs(counter, 'soft')}, decisions={seen}")
    assert counter.get("overlap:soft") is None, seen
    assert runs(counter, "soft") == 1  # the retry found the key done and replayed it
    assert result.get(timeout=30) == 1
    assert seen["acquired"] == 1 and seen["completed"] == 1


def test_a_returned_retry_gives_the_key_back_to_the_retry(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    app = make_app()
    returns_retry = app.tasks["t.returns_retry"]
    key = returns_retry.idemtask_key(("ret",)).key
    worker_process()
    result = returns_retry.delay("ret")
    wait_for(lambda: decisions(counter, key).get("completed"), 30, "the retry's completion")
    assert result.get(timeout=30) == "run 2"
    assert app.send_task("t.returns_retry", args=("ret",)).get(timeout=30) == "run 2"
    seen = decisions(counter, key)
    print(f"\nreturned retry: body runs={runs(counter, 'ret')}, decisions={seen}")
    assert runs(counter, "ret") == 2
    assert seen["released"] == 1 and seen["completed"] == 1
    assert "stale_completion" not in seen and "deferred" not in seen


def test_an_unencodable_result_is_one_failure_for_every_handle(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    app = make_app()
    unencodable = app.tasks["t.unencodable"]
    worker_process()
    first = unencodable.delay("enc")
    with pytest.raises(TaskFailedError) as original:
        first.get(timeout=30)
    assert first.state == "FAILURE"
    later = app.send_task("t.unencodable", args=("enc",))
    with pytest.raises(TaskFailedError) as replayed:
        later.get(timeout=30)
    assert later.state == "FAILURE"
    duplicate = unencodable.delay("enc")
    assert duplicate.id == first.id
    assert str(original.value) == str(replayed.value)
    assert "EncodeError" in str(original.value)
    assert runs(counter, "enc") == 1


def test_an_oversized_result_is_one_failure_for_every_handle(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    """A result over ``max_result_bytes`` cannot be replayed, so no handle gets it: not the
    original (Celery's backend would keep a value every redelivery contradicts), and never a
    silent ``None``. Every handle raises the same error, which says why."""
    app = make_app()
    oversized = app.tasks["t.oversized"]
    worker_process()
    first = oversized.delay("big")
    with pytest.raises(TaskFailedError) as original:
        first.get(timeout=30)
    assert first.state == "FAILURE"
    later = app.send_task("t.oversized", args=("big",))
    with pytest.raises(TaskFailedError) as replayed:
        later.get(timeout=30)
    assert later.state == "FAILURE"
    assert oversized.delay("big").id == first.id
    assert str(original.value) == str(replayed.value)
    assert "result not stored (1002 bytes > max_result_bytes=64)" in str(original.value)
    assert runs(counter, "big") == 1


def test_a_message_expired_before_it_ran_gives_its_reservation_back(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    """Celery acks an expired (or revoked) message without calling the task: its key must
    not keep answering duplicate calls with that dead handle until ``reservation_ttl``."""
    app = make_app()
    record = app.tasks["t.record"]
    key = record.idemtask_key(("rv",)).key
    store = record._guard().store
    worker_process()
    expired = record.apply_async(("rv",), expires=datetime.now(timezone.utc) - timedelta(1))
    reserved = store.inspect(key)
    assert reserved is not None and reserved.task_id == expired.id
    wait_for(lambda: (store.inspect(key) or reserved).state is State.IDLE, 30, "the release")
    assert expired.state == "REVOKED"
    again = record.delay("rv")
    assert again.id != expired.id
    assert again.get(timeout=30) == {"token": "rv", "done": 1}
    assert runs(counter, "rv") == 1
