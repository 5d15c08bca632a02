"""The Celery side of the chaos scenario: ``celery -A idemtask.testing.chaos.celery_app
worker`` in worker processes, and ``build`` in producers.

Settings come from ``IDTCHAOS_*`` variables set by the runner: broker and result
backend on one Redis, the store on its own Redis (restarted during the run), the ledger on a
third, ``presets.apply`` with a short visibility timeout so that a frozen child's message is
redelivered within a run.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals, states

from idemtask.celery import IdempotentTask, presets
from idemtask.celery.task import KEY_HEADER
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
            "result_ttl": workload.result_ttl(),
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
    def work(key: str, ms: int, linger: bool, fenced: bool, cpu: bool = False) -> str:
        return workload.run_body(_ledger, key, ms, fenced, cpu)

    return app


# Each delivery in the ledger: ``delivered`` before the guard decides, ``republished`` for a
# copy it sends (a deferral), and how it is settled once the task returns. With acks late
# the parent acks every task that returned, whatever its state, except a rejected one
# (requeued); a child killed before returning settles nothing (the message is redelivered).


def _delivered(task_id: str, task: Any, args: Any = (), **_: Any) -> None:
    request = task.request
    key = (request.headers or {}).get(KEY_HEADER) or request.get(KEY_HEADER) or ""
    _ledger.begin_delivery(key=str(key), task_id=task_id, name=str(args[0]) if args else "")


def _republished(headers: Any = None, **_: Any) -> None:
    if _ledger.current_delivery():
        _ledger.record("republished", key="", task_id=str((headers or {}).get("id", "")))


def _settled(task_id: str, state: str | None = None, **_: Any) -> None:
    delivery = _ledger.end_delivery()
    if delivery:
        kind = "requeued" if state == states.REJECTED else "acked"
        _ledger.settled(kind, delivery=delivery, task_id=task_id)


signals.task_prerun.connect(_delivered, weak=False)
signals.after_task_publish.connect(_republished, weak=False)
signals.task_postrun.connect(_settled, weak=False)
app = build()
_ledger.observe()
