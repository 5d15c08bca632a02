"""The Celery app the end-to-end benchmark publishes to and its worker runs.

One app holds every variant, so one worker process serves them all and every variant runs
with the same Celery settings (JSON, and idemtask's ``at_least_once`` preset, which is what
a deployment that relies on the guard runs: late acks, prefetch 1, STARTED tracked): what
differs between them is only the task base class. The worker imports it as
``celery -A benchmarks.celery_app:app`` with the URLs in ``BENCH_*`` variables.

The body sleeps ``body_ms`` milliseconds (0: not at all) and returns its second argument;
the first is the run's id, so keys never repeat across rounds.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import celery_once.backends.redis
import celery_singleton.backends
from celery import Celery, Task
from celery_once import QueueOnce
from celery_singleton import Singleton

from benchmarks.body import body
from idemtask.celery import IdempotentTask, presets

QUEUE = "bench"


@dataclass(frozen=True)
class Tasks:
    plain: Task
    idem: Task
    once: Task
    singleton: Task


def build_app(broker_url: str, backend_url: str, store_url: str) -> tuple[Celery, Tasks]:
    """The app and its four tasks, one per library, with identical bodies."""
    # Both libraries keep their Redis client in a module global, made on first use: forget
    # it, so an app built for other servers (a second run in one process) does not reuse it.
    celery_once.backends.redis.redis = None
    celery_singleton.backends._backend = None
    app = Celery("bench", broker=broker_url, backend=backend_url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # idemtask: only the store URL, every option at its default.
        idemtask={"redis_url": store_url},
        # celery-once, as its README configures it.
        ONCE={
            "backend": "celery_once.backends.Redis",
            "settings": {"url": store_url, "default_timeout": 60 * 60},
        },
        # celery-singleton, as its README configures it.
        singleton_backend_url=store_url,
    )
    presets.apply(app)

    @app.task(name="bench.plain", shared=False)  # type: ignore[untyped-decorator]
    def plain(run: str, n: int, body_ms: float = 0) -> int:
        return body(n, body_ms)

    @app.task(name="bench.idem", base=IdempotentTask, shared=False)  # type: ignore[untyped-decorator]
    def idem(run: str, n: int, body_ms: float = 0) -> int:
        return body(n, body_ms)

    @app.task(name="bench.once", base=QueueOnce, shared=False)  # type: ignore[untyped-decorator]
    def once(run: str, n: int, body_ms: float = 0) -> int:
        return body(n, body_ms)

    @app.task(name="bench.singleton", base=Singleton, shared=False)  # type: ignore[untyped-decorator]
    def singleton(run: str, n: int, body_ms: float = 0) -> int:
        return body(n, body_ms)

    return app, Tasks(plain, idem, once, singleton)


def forget_results(app: Celery) -> None:
    """Drop the result backend's subscriptions: Celery subscribes to every published task's
    result channel and nobody reads them here, so no run may inherit that backlog, and an
    AsyncResult collected after the servers stopped must find nothing to unsubscribe."""
    gc.collect()
    consumer = app.backend.result_consumer
    consumer.stop()
    consumer._pubsub = None
    consumer.subscribed_to.clear()


def close_app(app: Celery) -> None:
    forget_results(app)
    app.close()


def _from_environment() -> Any:
    if "BENCH_BROKER" not in os.environ:
        return None
    built, _ = build_app(
        os.environ["BENCH_BROKER"], os.environ["BENCH_BACKEND"], os.environ["BENCH_STORE"]
    )
    return built


app = _from_environment()
