"""The Celery app and the Dramatiq broker whose workers the busy-duplicate benchmark runs.

Each framework has one guarded task, ``busy_job(run, hold)``: its body marks when it started,
holds the key for ``hold`` seconds and marks when it ended, in a Redis database of its own
(``BENCH_MARKS``), so the driver can time every duplicate's answer from the holder's end.
Every guard decision is counted there too (``decisions:<name>``), and each message's
deferrals (``deferred:<message id>``). idemtask runs with its default settings. The workers
import this module as ``celery -A benchmarks.busy_apps:celery_app`` and
``dramatiq benchmarks.busy_apps:broker`` with the URLs in ``BENCH_*`` variables.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
from celery import Celery
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from idemtask import events
from idemtask.celery import IdempotentTask
from idemtask.dramatiq import IdempotencyMiddleware

QUEUE = "busy"
CELERY_TASK = "busy.job"
DRAMATIQ_ACTOR = "busy_job"


def started_key(run: str) -> str:
    return f"started:{run}"


def finished_key(run: str) -> str:
    return f"finished:{run}"


def deferred_key(message_id: str) -> str:
    return f"deferred:{message_id}"


def _body(marks: redis.Redis, run: str, hold: float) -> str:
    marks.set(started_key(run), repr(time.time()))
    time.sleep(hold)
    marks.set(finished_key(run), repr(time.time()))
    return run


def build_celery(broker_url: str, backend_url: str, store_url: str, marks_url: str) -> Celery:
    """The app (JSON, Celery's defaults) with its one idempotent task."""
    marks = redis.Redis.from_url(marks_url)
    app = Celery("busy", broker=broker_url, backend=backend_url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        idemtask={"redis_url": store_url},
    )

    @app.task(name=CELERY_TASK, base=IdempotentTask, shared=False)  # type: ignore[untyped-decorator]
    def job(run: str, hold: float) -> str:
        return _body(marks, run, hold)

    return app


@dataclass(frozen=True)
class DramatiqApp:
    broker: RedisBroker
    backend: RedisBackend
    job: Any


def build_dramatiq(
    broker_url: str, backend_url: str, store_url: str, marks_url: str
) -> DramatiqApp:
    """A Redis broker with Results and the middleware before Retries, set as the global
    broker, and its one idempotent actor."""
    marks = redis.Redis.from_url(marks_url)
    broker = RedisBroker(url=broker_url)  # type: ignore[no-untyped-call]
    backend = RedisBackend(url=backend_url)
    broker.add_middleware(Results(backend=backend))  # type: ignore[no-untyped-call]
    broker.add_middleware(IdempotencyMiddleware(redis_url=store_url), before=Retries)
    dramatiq.set_broker(broker)

    @dramatiq.actor(
        actor_name=DRAMATIQ_ACTOR, queue_name=QUEUE, store_results=True, idempotent=True
    )
    def job(run: str, hold: float) -> str:
        return _body(marks, run, hold)

    return DramatiqApp(broker, backend, job)


def _count_decisions(marks_url: str) -> None:
    marks = redis.Redis.from_url(marks_url)

    def count(event: events.Event) -> None:
        marks.incr(f"decisions:{event.decision.value}")
        if event.decision is events.Decision.DEFERRED:
            marks.incr(deferred_key(event.task_id))

    events.add_observer(count)


celery_app: Celery | None = None
broker: RedisBroker | None = None
if "BENCH_MARKS" in os.environ:
    logging.getLogger("idemtask").setLevel(logging.WARNING)
    _urls = (
        os.environ["BENCH_BROKER"],
        os.environ["BENCH_BACKEND"],
        os.environ["BENCH_STORE"],
        os.environ["BENCH_MARKS"],
    )
    _count_decisions(os.environ["BENCH_MARKS"])
    if os.environ.get("BENCH_FRAMEWORK") == "celery":
        celery_app = build_celery(*_urls)
    else:
        broker = build_dramatiq(*_urls).broker
