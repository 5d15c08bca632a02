"""A Dramatiq app for crash tests, configured from environment variables.

The test process calls :func:`build` to send messages; ``python dramatiq_crash_app.py`` runs
a worker process on the same broker, which the test kills with SIGKILL mid-message. Body
runs, side effects and every guard decision are counted in Redis, so the test can read what
each process did after it died.

Variables: ``IDT_BROKER`` (``redis`` or ``rabbitmq``), ``IDT_BROKER_URL``, ``IDT_NAMESPACE``
(Redis namespace and queue suffix), ``IDT_STORE_URL``, ``IDT_COUNTER_URL``, ``IDT_LEASE``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from idemtask import events
from idemtask.dramatiq import IdempotencyMiddleware

HEARTBEAT_TIMEOUT_MS = 2_000


@dataclass
class App:
    broker: dramatiq.Broker
    job: dramatiq.Actor[Any, Any]
    counters: redis.Redis
    namespace: str

    def count(self, what: str) -> int:
        return int(self.counters.get(f"{self.namespace}:{what}") or 0)

    def deferrals(self, message_id: str) -> list[tuple[int, float]]:
        """Each deferral of the message, in order: (count carried, delay)."""
        items = self.counters.lrange(f"{self.namespace}:deferrals:{message_id}", 0, -1)
        return [tuple(json.loads(item)) for item in items]


def build() -> App:
    env = os.environ
    namespace = env["IDT_NAMESPACE"]
    counters = redis.Redis.from_url(env["IDT_COUNTER_URL"])
    if env["IDT_BROKER"] == "redis":
        broker: dramatiq.Broker = RedisBroker(
            url=env["IDT_BROKER_URL"],
            namespace=namespace,
            heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
            maintenance_chance=1_000_000,  # every fetch requeues dead workers' messages
        )
    else:
        broker = RabbitmqBroker(url=env["IDT_BROKER_URL"])
    broker.add_middleware(
        Results(backend=RedisBackend(client=counters, namespace=f"{namespace}-results"))
    )
    broker.add_middleware(
        IdempotencyMiddleware(
            redis_url=env["IDT_STORE_URL"], key_prefix=namespace, lease=float(env["IDT_LEASE"])
        ),
        before=Retries,
    )
    dramatiq.set_broker(broker)

    def key(what: str) -> str:
        return f"{namespace}:{what}"

    @dramatiq.actor(
        actor_name="crash_job",
        queue_name=f"crash_{namespace}",
        idempotent=True,
        store_results=True,
        max_retries=0,
    )
    def job(job_id: str, hold: float = 0.0) -> str:
        runs = counters.incr(key(f"runs:{job_id}"))
        if runs == 1 and hold:
            counters.set(key(f"started:{job_id}"), os.getpid())
            time.sleep(hold)  # the test kills the process here
        counters.incr(key(f"effects:{job_id}"))
        return f"done {job_id}"

    return App(broker, job, counters, namespace)


def main() -> None:
    app = build()

    def record(event: events.Event) -> None:
        app.counters.incr(f"{app.namespace}:decision:{event.decision.value}")
        if event.decision is events.Decision.DEFERRED:
            carried = json.dumps([event.fields.get("deferrals"), event.fields.get("delay")])
            app.counters.rpush(f"{app.namespace}:deferrals:{event.task_id}", carried)

    events.add_observer(record)
    worker = dramatiq.Worker(app.broker, worker_threads=2, worker_timeout=100)
    worker.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    app.counters.set(f"{app.namespace}:ready:{os.getpid()}", 1)
    stop.wait()
    worker.stop()
    app.broker.close()


if __name__ == "__main__":
    main()
