"""A store that answers with an error reply (here OOM: ``maxmemory`` reached under the
``noeviction`` policy ``idemtask doctor`` asks for), with a real Dramatiq worker on a
RedisBroker and a real Redis store apart from the broker's.

At execute an actor with ``max_retries=0`` keeps its message (deferred), never
dead-lettered: the body runs once the store recovers. At enqueue ``on_store_error``
decides: publish unreserved by default, raise ``StoreUnavailable`` and publish nothing with
``"raise"``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from dramatiq_helpers import wait_for

import idemtask
from idemtask.dramatiq import IdempotencyMiddleware
from idemtask.errors import StoreRefused, StoreUnavailable
from idemtask.store.base import State

from servers import RedisServer, free_port

pytestmark = pytest.mark.dramatiq


@dataclass
class Env:
    broker: RedisBroker
    counters: redis.Redis
    namespace: str

    def queued(self, queue: str = "default") -> int:
        return int(self.broker.client.llen(f"{self.namespace}:{queue}"))

    def dead_letters(self, queue: str = "default") -> int:
        return int(self.broker.client.zcard(f"{self.namespace}:{queue}.XQ"))


@pytest.fixture
def env(redis_url: str) -> Iterator[Callable[..., Env]]:
    """Factory: a RedisBroker (db 3) with Results and the middleware (store = ``store_url``)."""
    base = redis_url.rsplit("/", 1)[0]
    made: list[Env] = []

    def make(store_url: str, **settings: Any) -> Env:
        namespace = f"f{uuid.uuid4().hex[:10]}"
        broker = RedisBroker(url=f"{base}/3", namespace=namespace)
        counters = redis.Redis.from_url(f"{base}/15")
        broker.add_middleware(Results(backend=RedisBackend(client=counters, namespace=namespace)))
        middleware = IdempotencyMiddleware(redis_url=store_url, key_prefix=namespace, **settings)
        broker.add_middleware(middleware, before=Retries)
        dramatiq.set_broker(broker)
        made.append(Env(broker, counters, namespace))
        return made[-1]

    yield make
    for made_env in made:
        made_env.broker.close()
        made_env.counters.close()


def _out_of_memory(store: RedisServer, full: bool) -> None:
    client = store.client()
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1 if full else 0)
    finally:
        client.close()


def test_out_of_memory_at_execute_is_not_dead_lettered_and_runs_after_recovery(
    env: Callable[..., Env], fresh_redis: Callable[..., RedisServer], decisions: Any
) -> None:
    store = fresh_redis()
    setup = env(store.url)
    runs = f"{setup.namespace}:runs"

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=0)
    def square(n: int) -> int:
        setup.counters.incr(runs)
        return n * n

    message = square.send(7)  # reserved while the store still has room
    _out_of_memory(store, full=True)
    worker = dramatiq.Worker(setup.broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        wait_for(
            lambda: decisions.count("store_unavailable") > 0 or setup.dead_letters() > 0,
            20,
            "a delivery refused by the store",
        )
        assert setup.dead_letters() == 0
        assert setup.counters.get(runs) is None
        _out_of_memory(store, full=False)
        wait_for(lambda: setup.counters.get(runs) is not None, 30, "the body after recovery")
        assert message.get_result(block=True, timeout=4_000) == 49
        assert int(setup.counters.get(runs) or 0) == 1
        assert setup.dead_letters() == 0
        assert decisions.count("deferred") >= 1
    finally:
        worker.stop()


def test_out_of_memory_at_enqueue_publishes_unreserved_by_default(
    env: Callable[..., Env], fresh_redis: Callable[..., RedisServer]
) -> None:
    store = fresh_redis()
    setup = env(store.url)

    @dramatiq.actor(idempotent=True, max_retries=0)
    def noop(n: int) -> None:
        pass

    _out_of_memory(store, full=True)
    noop.send(1)
    assert setup.queued() == 1


def test_out_of_memory_at_enqueue_raises_and_publishes_nothing_when_told(
    env: Callable[..., Env], fresh_redis: Callable[..., RedisServer]
) -> None:
    store = fresh_redis()
    setup = env(store.url, on_store_error="raise")

    @dramatiq.actor(idempotent=True, max_retries=0)
    def noop(n: int) -> None:
        pass

    _out_of_memory(store, full=True)
    with pytest.raises(StoreUnavailable) as raised:
        noop.send(1)
    assert isinstance(raised.value, StoreRefused) and raised.value.reason == "OOM"
    assert setup.queued() == 0


@pytest.mark.parametrize("refused", ["completion", "step"])
def test_a_completion_or_step_the_store_refuses_keeps_the_message_until_it_is_recorded(
    env: Callable[..., Env], fresh_redis: Callable[..., RedisServer], decisions: Any, refused: str
) -> None:
    """The store refuses (OOM) from inside the body (``step``: before its step can be
    recorded) or from its end (``completion``) for longer than the lease, so the key's
    outcome never lands. The message must not be acked with its record left ``running``, nor
    failed with the step's ``StoreUnavailable`` (retried away, or dead-lettered with no
    retry left): it is set aside (no retry spent, nothing dead-lettered), runs again once
    the store recovers, and the key ends ``done``."""
    store = fresh_redis()
    setup = env(store.url, lease=1)
    runs = f"{setup.namespace}:runs"

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=0)
    def unrecorded(n: int) -> int:
        count = int(setup.counters.incr(runs))
        if count == 1:
            _out_of_memory(store, full=True)
        if refused == "step":
            idemtask.step("charge", lambda: n)
        return count

    message = unrecorded.send(3)
    worker = dramatiq.Worker(setup.broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        wait_for(
            lambda: decisions.count("store_unavailable") > 0 or setup.dead_letters() > 0,
            20,
            f"a {refused} refused by the store",
        )
        time.sleep(0.5)
        _out_of_memory(store, full=False)
        assert message.get_result(block=True, timeout=30_000) == 2
        assert int(setup.counters.get(runs) or 0) == 2
        assert setup.dead_letters() == 0
        middleware = next(
            m for m in setup.broker.middleware if isinstance(m, IdempotencyMiddleware)
        )
        record = middleware.guard.store.inspect(middleware.derive("unrecorded", (3,), {}).key)
        assert record is not None and record.state is State.DONE
    finally:
        worker.stop()


def test_a_worker_on_the_in_process_store_warns_at_start_that_it_guards_nothing_across_processes(
    env: Callable[..., Env], caplog: pytest.LogCaptureFixture
) -> None:
    """``memory://`` (no redis_url) keeps records in each worker process: a duplicate that
    another process takes runs again. A worker on a real broker says so as it boots, as a
    Celery worker does."""
    setup = env("memory://")

    @dramatiq.actor(idempotent=True)
    def guarded(n: int) -> None: ...

    worker = dramatiq.Worker(setup.broker, worker_threads=1, worker_timeout=100)
    with caplog.at_level(logging.WARNING, logger="idemtask.dramatiq"):
        worker.start()
        worker.stop()
    assert caplog.text.count("MemoryStore guards nothing across worker processes") == 1, caplog.text
    assert "no redis_url given to IdempotencyMiddleware" in caplog.text


def test_a_worker_warns_once_at_start_when_the_store_cannot_be_reached(
    env: Callable[..., Env], caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose store does not answer says so once as it boots, with the URL's
    password redacted (its guarded actors are deferred until the store answers)."""
    setup = env(f"redis://:hunter2-pw@127.0.0.1:{free_port()}/1")

    @dramatiq.actor(idempotent=True)
    def guarded(n: int) -> None: ...

    worker = dramatiq.Worker(setup.broker, worker_threads=2, worker_timeout=100)
    with caplog.at_level(logging.WARNING):
        worker.start()
        try:
            wait_for(lambda: "cannot reach the store" in caplog.text, 20, "the warning")
            time.sleep(0.5)
        finally:
            worker.stop()
    assert caplog.text.count("cannot reach the store") == 1, caplog.text
    assert "redis://:***@127.0.0.1:" in caplog.text
    assert "hunter2-pw" not in caplog.text


def test_a_terminal_failure_the_store_refuses_keeps_the_message_until_it_is_recorded(
    env: Callable[..., Env], fresh_redis: Callable[..., RedisServer], decisions: Any
) -> None:
    """A terminal error the store would not record is not the key's answer yet: the message
    is set aside instead of being failed, runs again once the store recovers, and the key
    ends ``failed``."""
    store = fresh_redis()
    setup = env(store.url, lease=1)
    runs = f"{setup.namespace}:runs"

    @dramatiq.actor(
        idempotent=True, store_results=True, max_retries=0, terminal_exceptions=(LookupError,)
    )
    def unrecorded_failure(n: int) -> None:
        if int(setup.counters.incr(runs)) == 1:
            _out_of_memory(store, full=True)
        raise LookupError(f"no order {n}")

    unrecorded_failure.send(4)
    worker = dramatiq.Worker(setup.broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        wait_for(
            lambda: decisions.count("store_unavailable") > 0 or setup.dead_letters() > 0,
            20,
            "a failure refused by the store",
        )
        time.sleep(0.5)
        _out_of_memory(store, full=False)
        wait_for(lambda: setup.dead_letters() > 0, 30, "the recorded failure")
        assert int(setup.counters.get(runs) or 0) == 2
        middleware = next(
            m for m in setup.broker.middleware if isinstance(m, IdempotencyMiddleware)
        )
        key = middleware.derive("unrecorded_failure", (4,), {}).key
        record = middleware.guard.store.inspect(key)
        assert record is not None and record.state is State.FAILED
    finally:
        worker.stop()
