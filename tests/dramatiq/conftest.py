"""Fixtures for the Dramatiq adapter: brokers with the idempotency middleware, real workers,
body-run counters in Redis (kept apart from idemtask's own keys) and recorded decisions."""

from __future__ import annotations

import os
import signal
import subprocess
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
ROOT = Path(HERE).parents[1]
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


@pytest.fixture
def steps_app_env() -> dict[str, str]:
    """More ``IDT_*`` variables for ``steps_app`` (a test module overrides this)."""
    return {}


@pytest.fixture
def steps_app(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, steps_app_env: dict[str, str]
) -> Iterator[tuple[Any, Any]]:
    """``dramatiq_steps_app`` built here to send, and ``start()`` for a worker process."""
    base = redis_url.rsplit("/", 1)[0]
    env = {
        "IDT_BROKER_URL": f"{base}/2",
        "IDT_NAMESPACE": f"s{uuid.uuid4().hex[:10]}",
        "IDT_STORE_URL": f"{base}/1",
        "IDT_COUNTER_URL": f"{base}/15",
        "IDT_LEASE": "2.0",
        **steps_app_env,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import dramatiq_steps_app
    from dramatiq_helpers import wait_for

    app = dramatiq_steps_app.build()
    procs: list[subprocess.Popen[bytes]] = []
    log = open(  # noqa: SIM115 - closed below
        Path(os.environ.get("TMPDIR", "/tmp")) / f"{env['IDT_NAMESPACE']}.log", "wb"
    )

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, str(Path(HERE) / "dramatiq_steps_app.py")],
            env={**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), HERE])},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        ready = f"{env['IDT_NAMESPACE']}:ready:{proc.pid}"
        wait_for(lambda: proc.poll() is None and app.counters.exists(ready), 60, "worker up")
        return proc

    yield app, start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    log.close()
    app.broker.close()
    app.counters.close()
