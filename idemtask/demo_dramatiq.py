"""The Dramatiq demo: four things that cause duplicate executions in production happen to one
``charge`` actor on Dramatiq's in-process ``StubBroker`` and a real ``Worker``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import click

from idemtask.demo import LEASE, Check, Narrator, demo_settings, step, summarize, wait_for
from idemtask.events import add_observer, remove_observer
from idemtask.redact import redact_url


def run_dramatiq_demo(redis_url: str | None = None) -> bool:
    """Run the scenarios; True when every check held."""
    import dramatiq
    from dramatiq.brokers.stub import StubBroker
    from dramatiq.middleware import Retries
    from dramatiq.results import Results
    from dramatiq.results.backends import StubBackend

    from idemtask.dramatiq import IdempotencyMiddleware

    settings = demo_settings(redis_url)
    broker = StubBroker()
    broker.emit_after("process_boot")
    broker.add_middleware(Results(backend=StubBackend()))  # type: ignore[no-untyped-call]
    middleware = IdempotencyMiddleware(**settings)
    broker.add_middleware(middleware, before=Retries)
    dramatiq.set_broker(broker)

    runs: Counter[int] = Counter()
    slow = {3}

    @dramatiq.actor(idempotent=True, idempotency_key=("order_id",), store_results=True)
    def charge(order_id: int, amount: int) -> dict[str, int]:
        runs[order_id] += 1
        click.echo(f"      body: charging order {order_id} {amount} EUR (run {runs[order_id]})")
        if order_id in slow:
            time.sleep(1.5)
        return {"order_id": order_id, "charged": amount}

    logging.getLogger("dramatiq").setLevel(logging.ERROR)  # skipped copies are expected here
    narrator = Narrator()
    add_observer(narrator)
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    checks: list[Check] = []
    store = middleware.guard.store
    where = redact_url(redis_url) if redis_url else "the embedded in-process store (MemoryStore)"
    click.secho(f"idemtask demo: a Dramatiq worker, idemtask's store on {where}\n", bold=True)

    def result(message: Any) -> Any:
        return message.get_result(block=True, timeout=15_000)

    def settle() -> None:
        broker.join(charge.queue_name, timeout=20_000)
        worker.join()

    try:
        step("1. A caller retries: charge.send(order_id=1, amount=10) twice")
        first = charge.send(1, 10)
        second = charge.send(1, 10)
        click.echo(f"   first message {first.message_id[:8]}, second {second.message_id[:8]}")
        value = result(second)
        click.echo(f"   second handle's result: {value}")
        settle()
        same = first.message_id == second.message_id
        checks.append(("duplicate send returns the original message", same))
        checks.append(("order 1 charged once", runs[1] == 1))

        step("2. A lost ack: the broker redelivers order 1's completed message")
        broker.enqueue(first)
        settle()
        click.echo(f"   result after the redelivery: {result(first)}")
        checks.append(("redelivered completed message replayed, not run", runs[1] == 1))

        step("3. A visibility timeout: a copy of a running message is delivered")
        running = charge.send(3, 30)
        wait_for(lambda: runs[3] == 1)
        broker.enqueue(running)  # the same message again, while the first copy runs
        settle()
        click.echo(f"   result: {result(running)}")
        checks.append(("busy copy deferred, then replayed; order 3 charged once", runs[3] == 1))

        step("4. A worker crashed mid-task: its lease is left behind")
        crashed = charge.message(4, 40)
        call = middleware._stamp(crashed)
        store.acquire(
            call.key,
            task_id=crashed.message_id,
            attempt_id="worker-that-crashed",
            task_name="charge",
            fingerprint=call.fingerprint,
            lease_ms=int(LEASE * 1000),
            max_deliveries=5,
            ttl_ms=600_000,
        )
        click.echo("   a worker took order 4 (fencing token 1) and died; the broker redelivers")
        broker.enqueue(crashed)
        settle()
        record = store.inspect(call.key)
        token = record.token if record else 0
        click.echo(f"   result: {result(crashed)}  (record fencing token now {token})")
        checks.append(
            (
                "crashed holder taken over after its lease; order 4 charged once",
                runs[4] == 1 and token == 2,
            )
        )
    finally:
        worker.stop()
        remove_observer(narrator)
        broker.close()

    return summarize(narrator, runs, checks)
