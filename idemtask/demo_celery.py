"""The Celery demo: a real Celery worker in this process (kombu's ``memory://`` transport, the
``threads`` pool, an in-memory result backend) runs one guarded ``charge`` task while a caller
retries and the broker redelivers a completed message.
"""

from __future__ import annotations

import logging
from collections import Counter

import click

from idemtask.demo import Check, Narrator, demo_settings, step, summarize, wait_for
from idemtask.events import add_observer, remove_observer
from idemtask.redact import redact_url

TIMEOUT = 20.0  # seconds a result is waited for


def run_celery_demo(redis_url: str | None = None) -> bool:
    """Run the scenarios; True when every check held."""
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    from idemtask.celery import IdempotentTask

    app = Celery(
        "idemtask_demo",
        broker="memory://",
        backend="cache+memory://",
        task_cls=IdempotentTask,
        set_as_current=False,
    )
    app.conf.update(task_acks_late=True, worker_hijack_root_logger=False)
    app.conf.idemtask = demo_settings(redis_url)
    runs: Counter[int] = Counter()

    @app.task(name="demo.charge", idempotency_key=("order_id",))  # type: ignore[untyped-decorator, unused-ignore]
    def charge(order_id: int, amount: int) -> dict[str, int]:
        runs[order_id] += 1
        click.echo(f"      body: charging order {order_id} {amount} EUR (run {runs[order_id]})")
        return {"order_id": order_id, "charged": amount}

    logging.getLogger("celery").setLevel(logging.ERROR)
    narrator = Narrator()
    add_observer(narrator)
    checks: list[Check] = []
    where = redact_url(redis_url) if redis_url else "the embedded in-process store (MemoryStore)"
    click.secho(f"idemtask demo: a Celery worker, idemtask's store on {where}\n", bold=True)
    try:
        with start_worker(
            app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="ERROR"
        ):
            step("1. A caller retries: charge.delay(order_id=1, amount=10) twice")
            first = charge.delay(1, 10)
            second = charge.delay(1, 10)
            click.echo(f"   first task id {first.id[:8]}, second {second.id[:8]}")
            click.echo(f"   second handle's result: {second.get(timeout=TIMEOUT)}")
            checks.append(("duplicate call returns the original task id", first.id == second.id))
            checks.append(("order 1 charged once", runs[1] == 1))

            step("2. A lost ack: the broker redelivers order 1's completed message")
            replays = narrator.decisions["replayed"]
            again = app.send_task("demo.charge", args=(1, 10), task_id=first.id)
            wait_for(lambda: narrator.decisions["replayed"] > replays, TIMEOUT)
            click.echo(f"   result after the redelivery: {again.get(timeout=TIMEOUT)}")
            replayed = narrator.decisions["replayed"] > replays
            checks.append(("redelivered completed message replayed, not run", replayed))
            checks.append(("order 1 still charged once", runs[1] == 1))
    finally:
        remove_observer(narrator)
        app.close()
    return summarize(narrator, runs, checks)
