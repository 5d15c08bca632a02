"""A Celery app for the metrics test: its worker serves idemtask's metrics on ``/metrics``
(prefork pool, multiprocess mode); configured by ``MTEST_*`` variables."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from idemtask.celery import IdempotentTask, presets
from idemtask.contrib.prometheus import celery_worker_metrics

app = Celery(
    "metrics",
    broker=os.environ["MTEST_BROKER"],
    backend=os.environ["MTEST_BACKEND"],
    task_cls=IdempotentTask,
)
app.conf.update(presets.at_least_once(visibility_timeout=60))
app.conf.idemtask = {"redis_url": os.environ["MTEST_STORE"]}
celery_worker_metrics(port=int(os.environ["MTEST_METRICS_PORT"]))
_pids = redis.Redis.from_url(os.environ["MTEST_STORE"])


@app.task(name="metrics.charge")
def charge(order_id: int) -> int:
    return order_id


@app.task(name="metrics.fanout")
def fanout(count: int) -> int:
    """Enqueues every charge twice: the second is a duplicate saved at enqueue."""
    for order_id in range(count):
        charge.delay(order_id)
        charge.delay(order_id)
    return count


@app.task(name="metrics.slow", lease=1.5)
def slow(order_id: str, seconds: float) -> str:
    _pids.rpush(f"pids:{order_id}", os.getpid())
    time.sleep(seconds)
    return order_id
