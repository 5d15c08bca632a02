"""The Celery side of the chaos scenario: ``celery -A idemtask.testing.chaos.celery_app
worker`` in worker processes, and ``build`` in producers.

Settings come from ``IDTCHAOS_*`` variables set by the runner: broker and result
backend on one Redis, the store on its own Redis (restarted during the run), the ledger on a
third, ``presets.apply`` with a short visibility timeout so that a frozen child's message is
redelivered within a run.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from idemtask.celery import IdempotentTask, presets
from idemtask.testing.chaos import workload

_ledger = workload.ledger_from_env()


class LingeringTask(IdempotentTask):
    """Waits after idemtask recorded the completion and before Celery stores the result and
    acks, for the jobs planned to linger: the window of a kill between body end and ack."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        value = super().__call__(*args, **kwargs)
        if len(args) > 2 and args[2]:
            workload.linger(_ledger, str(args[0]))
        return value


def build() -> Celery:
    visibility = float(workload.env("VISIBILITY"))
    app = Celery(
        "idemtask-chaos",
        broker=workload.env("BROKER_URL"),
        backend=workload.env("BACKEND_URL"),
        task_cls=IdempotentTask,
    )
    presets.apply(app, visibility_timeout=visibility)
    # Restore unacked messages every second, so a frozen or killed child's message comes
    # back one visibility timeout after it was taken, not up to a minute later.
    app.conf.broker_transport_options.update(unacked_restore_interval=1, unacked_restore_throttle=1)
    app.conf.update(
        idemtask={
            "redis_url": workload.env("STORE_URL"),
            "lease": float(workload.env("LEASE")),
            "result_ttl": 3600,
            # Every submission is published: the execute guard, not the enqueue dedupe,
            # has to keep the three copies of a key from running twice.
            "on_duplicate": "enqueue",
            "max_deliveries": 50,
        },
        task_default_queue=workload.env("QUEUE"),
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        task_default_retry_delay=0.5,
    )

    @app.task(  # type: ignore[untyped-decorator]
        name=workload.TASK_NAME, base=LingeringTask, idempotency_key=("key",)
    )
    def work(key: str, ms: int, linger: bool, fenced: bool) -> str:
        return workload.run_body(_ledger, key, ms, fenced)

    return app


app = build()
_ledger.observe()
