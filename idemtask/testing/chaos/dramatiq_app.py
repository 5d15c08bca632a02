"""The Dramatiq side of the chaos scenario: ``python -m idemtask.testing.chaos.dramatiq_app``
is one worker process (2 threads); producers call ``build`` and send.

``IDTCHAOS_BROKER`` picks the broker: ``redis`` (RedisBroker with a short heartbeat
timeout and maintenance on every fetch, so a dead or frozen worker's messages are requeued
within seconds) or ``rabbitmq`` (RabbitmqBroker with publisher confirms and a 2 s AMQP
heartbeat, so a frozen worker's channel is closed and its messages redelivered).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware, Retries

from idemtask.dramatiq import IdempotencyMiddleware
from idemtask.dramatiq.middleware import KEY_OPTION
from idemtask.testing.chaos import workload
from idemtask.testing.ledger import EffectLedger

#: Milliseconds without a heartbeat after which a RedisBroker worker counts as dead.
HEARTBEAT_TIMEOUT_MS = 3_000
WORKER_THREADS = 2


class Linger(Middleware):
    """After the body and its recorded completion, before the ack: wait for the jobs planned
    to linger, so a kill can land between the completion and the ack."""

    def __init__(self, ledger: EffectLedger) -> None:
        self.ledger = ledger

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        args = message.args
        if exception is None and len(args) > 2 and args[2]:
            workload.linger(self.ledger, str(args[0]))


class Deliveries(Middleware):
    """Each delivery in the ledger: ``delivered`` before the guard decides (this middleware
    comes first), ``republished`` for a copy the worker sends while handling it (a deferral,
    a retry), and ``acked``/``nacked`` when the consumer settles it."""

    ATTRIBUTE = "_idtchaos_delivery"

    def __init__(self, ledger: EffectLedger) -> None:
        self.ledger = ledger

    def before_process_message(self, broker: Any, message: Any) -> None:
        key = str(message.options.get(KEY_OPTION, ""))
        name = str(message.args[0]) if message.args else ""
        delivery = self.ledger.begin_delivery(key=key, task_id=message.message_id, name=name)
        setattr(message, self.ATTRIBUTE, delivery)

    def after_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
        if self.ledger.current_delivery():
            self.ledger.record("republished", key="", task_id=message.message_id)

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        self.ledger.end_delivery()

    def after_skip_message(self, broker: Any, message: Any) -> None:
        self.ledger.end_delivery()

    def after_ack(self, broker: Any, message: Any) -> None:
        self._settled("acked", message)

    def after_nack(self, broker: Any, message: Any) -> None:
        self._settled("nacked", message)

    def _settled(self, kind: str, message: Any) -> None:
        delivery = str(message.__dict__.get(self.ATTRIBUTE, ""))
        if delivery:
            self.ledger.settled(kind, delivery=delivery, task_id=message.message_id)


@dataclass
class App:
    broker: Any
    work: Any
    ledger: EffectLedger


def build() -> App:
    ledger = workload.ledger_from_env()
    namespace = workload.env("NAMESPACE")
    url = workload.env("BROKER_URL")
    broker: Any
    if workload.env("BROKER") == "redis":
        broker = RedisBroker(  # type: ignore[no-untyped-call]
            url=url,
            namespace=namespace,
            heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
            maintenance_chance=1_000_000,  # every fetch requeues dead workers' messages
        )
    else:
        broker = RabbitmqBroker(url=url, confirm_delivery=True)
    broker.add_middleware(
        IdempotencyMiddleware(
            redis_url=workload.env("STORE_URL"),
            key_prefix=namespace,
            lease=float(workload.env("LEASE")),
            result_ttl=workload.result_ttl(),
            on_duplicate="enqueue",  # every submission published: the execute guard decides
            max_deliveries=50,
        ),
        before=Retries,
    )
    broker.add_middleware(Linger(ledger))
    broker.add_middleware(Deliveries(ledger), before=type(broker.middleware[0]))
    dramatiq.set_broker(broker)

    @dramatiq.actor(
        actor_name="idemtask_chaos_work",
        queue_name=f"chaos_{namespace}",
        idempotent=True,
        idempotency_key=("key",),
        max_retries=100,
        min_backoff=100,
        max_backoff=2_000,
    )
    def work(key: str, ms: int, linger: bool, fenced: bool, cpu: bool = False) -> str:
        return workload.run_body(ledger, key, ms, fenced, cpu)

    return App(broker, work, ledger)


def main() -> None:
    """One worker process; stops on SIGTERM. Writes ``ready`` to the ledger when consuming."""
    app = build()
    app.ledger.observe()
    worker = dramatiq.Worker(app.broker, worker_threads=WORKER_THREADS, worker_timeout=100)
    worker.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    app.ledger.record("ready", key="", pid=os.getpid())
    stop.wait()
    worker.stop()
    app.broker.close()


if __name__ == "__main__":
    main()
