"""A Dramatiq app whose actor runs three steps and kills its own worker after the second,
and, with ``IDT_SQL_URL``, one that writes a payment row through ``idemtask.sql.atomic`` and
kills its own worker right after the commit.

The test process calls :func:`build` to send; ``python dramatiq_steps_app.py`` runs a worker
on the same RedisBroker. On the first run only, the body SIGKILLs its process after step 2
is recorded (after the commit); every step's effect is counted in Redis, so the test can
read what each process did. Variables: ``IDT_BROKER_URL``, ``IDT_NAMESPACE``,
``IDT_STORE_URL``, ``IDT_COUNTER_URL``, ``IDT_LEASE``, ``IDT_SQL_URL`` (optional).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from sqlalchemy import Column, Integer, MetaData, Table, Text, create_engine
from sqlalchemy.orm import Session

import idemtask
import idemtask.sql
from idemtask import events
from idemtask.dramatiq import IdempotencyMiddleware

HEARTBEAT_TIMEOUT_MS = 2_000
STEPS = ("reserve", "charge", "write")

#: The user's table of the ``sql_pay`` actor.
user_md = MetaData()
payments = Table(
    "payments",
    user_md,
    Column("id", Integer, primary_key=True),
    Column("order_id", Text, nullable=False),
    Column("token", Integer, nullable=False),
)


@dataclass
class App:
    broker: dramatiq.Broker
    checkout: dramatiq.Actor[Any, Any]
    counters: redis.Redis
    namespace: str
    pay: dramatiq.Actor[Any, Any] | None = None

    def count(self, what: str) -> int:
        return int(self.counters.get(f"{self.namespace}:{what}") or 0)


def build() -> App:
    env = os.environ
    namespace = env["IDT_NAMESPACE"]
    counters = redis.Redis.from_url(env["IDT_COUNTER_URL"])
    broker = RedisBroker(
        url=env["IDT_BROKER_URL"],
        namespace=namespace,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=1_000_000,  # every fetch requeues dead workers' messages
    )
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

    def effect(order: str, name: str) -> int:
        return int(counters.incr(key(f"effect:{order}:{name}")))

    @dramatiq.actor(
        actor_name="steps_checkout",
        queue_name=f"steps_{namespace}",
        idempotent=True,
        store_results=True,
        max_retries=0,
    )
    def checkout(order: str) -> dict[str, int]:
        counters.incr(key(f"runs:{order}"))
        values = {}
        for name in STEPS:
            values[name] = idemtask.step(name, effect, order, name)
            if name == "charge" and counters.incr(key(f"kill:{order}")) == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # after step 2's effect is recorded
        return values

    sql_url = env.get("IDT_SQL_URL")
    pay = None
    if sql_url:
        engine = create_engine(sql_url)

        @dramatiq.actor(
            actor_name="sql_pay",
            queue_name=f"steps_{namespace}",
            idempotent=True,
            store_results=True,
            max_retries=0,
        )
        def pay(order: str) -> int:
            counters.incr(key(f"runs:{order}"))
            token = idemtask.current().fencing_token
            with Session(engine) as session, idemtask.sql.atomic(session) as effect:
                if not effect.replayed:
                    session.execute(payments.insert().values(order_id=order, token=token))
                    effect.value = token
            if counters.incr(key(f"kill:{order}")) == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # committed, not completed in Redis
            return int(effect.value)

    return App(broker, checkout, counters, namespace, pay)


def main() -> None:
    app = build()

    def record(event: events.Event) -> None:
        app.counters.incr(f"{app.namespace}:decision:{event.decision.value}")

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
