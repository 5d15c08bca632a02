"""A store that answers with an error reply (here OOM: ``maxmemory`` reached under the
``noeviction`` policy ``idemtask doctor`` asks for), with a real Celery worker and a real
Redis store apart from the broker's.

At execute the message is kept (deferred), never acked away as FAILURE: the body runs once
the store recovers. At enqueue ``on_store_error`` decides: publish unreserved by default,
raise ``StoreUnavailable`` and publish nothing with ``"raise"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from celery import Celery
from celery_support import Urls, running_worker, wait_for
from celery_testapp import decisions

import idemtask
from idemtask.errors import StoreRefused, StoreUnavailable
from idemtask.store.base import State

from servers import RedisServer

pytestmark = pytest.mark.celery


def _out_of_memory(store: RedisServer, full: bool) -> None:
    client = store.client()
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1 if full else 0)
    finally:
        client.close()


def _queued(urls: Urls) -> int:
    client = redis.Redis.from_url(urls.broker)
    try:
        return int(client.llen("celery"))
    finally:
        client.close()


def test_out_of_memory_at_execute_defers_and_runs_once_after_recovery(
    make_app: Callable[..., Celery],
    fresh_redis: Callable[..., RedisServer],
    counter: redis.Redis,
) -> None:
    store = fresh_redis()
    app = make_app(store_url=store.url)
    record = app.tasks["t.record"]
    key = record.idemtask_key(("oom-x",)).key
    result = record.delay("oom-x")  # reserved while the store still has room
    _out_of_memory(store, full=True)
    with running_worker(app, concurrency=1):
        wait_for(
            lambda: decisions(counter, key).get("store_unavailable") or result.ready(),
            20,
            "a delivery refused by the store",
        )
        assert not result.ready(), f"acked as {result.state}: {result.result!r}"
        assert counter.get("runs:oom-x") is None
        _out_of_memory(store, full=False)
        assert result.get(timeout=30) == {"token": "oom-x", "done": 1}
    assert result.state == "SUCCESS"
    assert int(counter.get("runs:oom-x") or 0) == 1
    assert decisions(counter, key).get("deferred", 0) >= 1


def test_out_of_memory_at_enqueue_publishes_unreserved_by_default(
    make_app: Callable[..., Celery],
    fresh_redis: Callable[..., RedisServer],
    urls: Urls,
) -> None:
    store = fresh_redis()
    app = make_app(store_url=store.url)
    _out_of_memory(store, full=True)
    app.tasks["t.record"].delay("oom-e")
    assert _queued(urls) == 1


def test_out_of_memory_at_enqueue_raises_and_publishes_nothing_when_told(
    make_app: Callable[..., Celery],
    fresh_redis: Callable[..., RedisServer],
    urls: Urls,
) -> None:
    store = fresh_redis()
    app = make_app(store_url=store.url, idemtask_conf={"on_store_error": "raise"})
    _out_of_memory(store, full=True)
    with pytest.raises(StoreUnavailable) as raised:
        app.tasks["t.record"].delay("oom-r")
    assert isinstance(raised.value, StoreRefused) and raised.value.reason == "OOM"
    assert _queued(urls) == 0


def test_a_body_whose_lease_cannot_be_renewed_sees_lease_lost(
    make_app: Callable[..., Celery],
    fresh_redis: Callable[..., RedisServer],
    counter: redis.Redis,
) -> None:
    """The store starts answering OOM while the body runs: renewals fail, and once a lease
    length passed without one the body is told (another worker may take the key over)."""
    store = fresh_redis()
    app = make_app(store_url=store.url, idemtask_conf={"lease": 1})

    @app.task(shared=False, name="t.watch")
    def watch(token: str) -> str:
        counter.incr(f"runs:{token}")
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            if idemtask.current().lease_lost:
                counter.set(f"lost:{token}", 1)
                return "lost"
            time.sleep(0.02)
        return "kept"

    with running_worker(app, concurrency=1):
        result = watch.delay("w1")
        wait_for(lambda: counter.get("runs:w1"), 20, "the body")
        _out_of_memory(store, full=True)
        wait_for(lambda: counter.get("lost:w1") or result.ready(), 20, "lease_lost or the end")
        _out_of_memory(store, full=False)
        assert counter.get("lost:w1") == b"1"
        result.get(timeout=30, propagate=False)


@pytest.mark.parametrize("refused", ["completion", "step"])
def test_a_completion_or_step_the_store_refuses_keeps_the_message_until_it_is_recorded(
    make_app: Callable[..., Celery],
    fresh_redis: Callable[..., RedisServer],
    counter: redis.Redis,
    refused: str,
) -> None:
    """The store starts refusing (OOM) inside the body (``step``: before its step can be
    recorded) or as it ends (``completion``), and stays so longer than the lease. The
    message must not be acked with its record left ``running`` (as SUCCESS, or as FAILURE
    with the step's ``StoreUnavailable``: no copy would be left to record the key): it is
    kept, runs again once the store recovers, and the key ends ``done``."""
    store = fresh_redis()
    app = make_app(store_url=store.url, idemtask_conf={"lease": 1})

    @app.task(shared=False, name="t.unrecorded")
    def unrecorded(token: str) -> int:
        runs = int(counter.incr(f"runs:{token}"))
        if runs == 1:
            _out_of_memory(store, full=True)
        if refused == "step":
            idemtask.step("charge", lambda: counter.incr(f"charges:{token}"))
        return runs

    key = unrecorded.idemtask_key(("u1",)).key
    with running_worker(app, concurrency=1):
        result = unrecorded.delay("u1")
        wait_for(
            lambda: decisions(counter, key).get("store_unavailable") or result.ready(),
            20,
            f"a {refused} refused by the store",
        )
        time.sleep(0.5)
        _out_of_memory(store, full=False)
        assert result.get(timeout=30) == 2
    assert int(counter.get("runs:u1") or 0) == 2
    record = unrecorded._guard().store.inspect(key)
    assert record is not None and record.state is State.DONE


def test_a_terminal_failure_the_store_refuses_keeps_the_message_until_it_is_recorded(
    make_app: Callable[..., Celery],
    fresh_redis: Callable[..., RedisServer],
    counter: redis.Redis,
) -> None:
    """As for a completion: a terminal error the store would not record is not acked as the
    key's FAILURE with the record left ``running``; the message runs again after recovery
    and the key ends ``failed``, the error every later handle replays."""
    store = fresh_redis()
    app = make_app(store_url=store.url, idemtask_conf={"lease": 1})

    @app.task(shared=False, name="t.unrecorded_failure", terminal_exceptions=(LookupError,))
    def unrecorded_failure(token: str) -> None:
        if int(counter.incr(f"runs:{token}")) == 1:
            _out_of_memory(store, full=True)
        raise LookupError(f"no order {token}")

    key = unrecorded_failure.idemtask_key(("f1",)).key
    with running_worker(app, concurrency=1):
        result = unrecorded_failure.delay("f1")
        wait_for(
            lambda: decisions(counter, key).get("store_unavailable") or result.ready(),
            20,
            "a failure refused by the store",
        )
        time.sleep(0.5)
        _out_of_memory(store, full=False)
        with pytest.raises(LookupError):
            result.get(timeout=30)
    assert int(counter.get("runs:f1") or 0) == 2
    record = unrecorded_failure._guard().store.inspect(key)
    assert record is not None and record.state is State.FAILED
