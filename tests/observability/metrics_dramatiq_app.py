"""A Dramatiq broker for the metrics test: Dramatiq's Prometheus middleware serves
idemtask's metrics too; configured by ``MTEST_*`` variables."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries
from dramatiq.middleware.prometheus import Prometheus

from idemtask.contrib.prometheus_dramatiq import IdempotencyMetrics
from idemtask.dramatiq import IdempotencyMiddleware

broker = RedisBroker(url=os.environ["MTEST_BROKER"])
broker.add_middleware(Prometheus())
broker.add_middleware(IdempotencyMetrics())
broker.add_middleware(IdempotencyMiddleware(redis_url=os.environ["MTEST_STORE"]), before=Retries)
dramatiq.set_broker(broker)


@dramatiq.actor(idempotent=True, actor_name="metrics.charge")
def charge(order_id: int) -> int:
    return order_id
