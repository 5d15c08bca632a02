"""Fixtures for the Dramatiq adapter: brokers with the idempotency middleware, real workers,
body-run counters in Redis (kept apart from idemtask's own keys) and recorded decisions."""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO, GroupCallbacks, Retries
from dramatiq.rate_limits.backends import StubBackend as RateLimitStubBackend
from dramatiq.results import Results
from dramatiq.results.backends import StubBackend

from idemtask import events
from idemtask.dramatiq import IdempotencyMiddleware

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the helper modules beside the tests, whatever the import mode
    sys.path.insert(0, HERE)


@dataclass
class Decisions:
    """Every guard decision made in this process during the test, counted by name."""

    seen: list[events.Event] = field(default_factory=list)

    def __call__(self, event: events.Event) -> None:
        self.seen.append(event)

    def count(self, decision: str) -> int:
        return sum(1 for e in self.seen if e.decision.value == decision)

    def counts(self) -> Counter[str]:
        return Counter(e.decision.value for e in self.seen)


@pytest.fixture
def decisions() -> Iterator[Decisions]:
    recorder = Decisions()
    events.add_observer(recorder)
    yield recorder
    events.remove_observer(recorder)


@dataclass
class Counters:
    """Body-run counters (``INCR``) in a Redis database idemtask does not touch."""

    client: redis.Redis
    prefix: str

    def hit(self, name: str) -> int:
        return int(self.client.incr(f"{self.prefix}:{name}"))

    def get(self, name: str) -> int:
        return int(self.client.get(f"{self.prefix}:{name}") or 0)


@pytest.fixture
def counters(redis_url: str) -> Iterator[Counters]:
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/15")
    client.flushdb()
    yield Counters(client, f"runs-{uuid.uuid4().hex[:8]}")
    client.close()


@dataclass
class StubEnv:
    broker: StubBroker
    middleware: IdempotencyMiddleware
    worker: dramatiq.Worker

    def start(self) -> StubEnv:
        """Start the worker: call it after declaring the actors (it consumes their queues)."""
        self.worker.start()
        return self

    def join(self, queue: str = "default", *, fail_fast: bool = False) -> None:
        self.broker.join(queue, fail_fast=fail_fast, timeout=30_000)
        self.worker.join()


@pytest.fixture
def stub_env(redis_url: str) -> Iterator[Callable[..., StubEnv]]:
    """Factory: a StubBroker with Results, GroupCallbacks, AsyncIO and the middleware (before
    Retries, store = the test's Redis), set as the global broker, and a running Worker."""
    made: list[StubEnv] = []

    def make(*, worker_threads: int = 2, store_url: str | None = None, **settings: Any) -> StubEnv:
        broker = StubBroker()
        broker.emit_after("process_boot")
        broker.add_middleware(Results(backend=StubBackend()))
        broker.add_middleware(GroupCallbacks(RateLimitStubBackend()))
        broker.add_middleware(AsyncIO())
        settings.setdefault("key_prefix", f"t{uuid.uuid4().hex[:8]}")
        middleware = IdempotencyMiddleware(
            redis_url=store_url if store_url is not None else redis_url, **settings
        )
        broker.add_middleware(middleware, before=Retries)
        dramatiq.set_broker(broker)
        worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=worker_threads)
        env = StubEnv(broker, middleware, worker)
        made.append(env)
        return env

    yield make
    for env in made:
        env.worker.stop()
        env.broker.close()
