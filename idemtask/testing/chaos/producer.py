"""One producer process: ``python -m idemtask.testing.chaos.producer PLAN INDEX``.

Sends its share of the plan (see ``producer_share``) to the framework named by
``IDTCHAOS_FRAMEWORK``, retrying a send that fails (a restarting broker) until it is
accepted, as a careful caller would. Each accepted send is recorded as ``submitted``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from idemtask.testing.chaos import workload

#: Seconds a failed send waits before it is tried again.
RESEND_DELAY = 0.5


def _sender() -> Callable[[workload.Job], tuple[str, str]]:
    """A function that sends one job and returns (idempotency key, message id)."""
    framework = workload.env("FRAMEWORK")
    if framework == "celery":
        from idemtask.testing.chaos import celery_app

        task = celery_app.app.tasks[workload.TASK_NAME]

        def send_celery(job: workload.Job) -> tuple[str, str]:
            args = (job.key, job.ms, job.linger, job.fenced, job.cpu)
            result = task.apply_async(args=args)
            return str(task.idemtask_key(args).key), str(result.id)

        return send_celery
    from idemtask.dramatiq.middleware import KEY_OPTION
    from idemtask.testing.chaos import dramatiq_app

    actor = dramatiq_app.build().work

    def send_dramatiq(job: workload.Job) -> tuple[str, str]:
        message = actor.send(job.key, job.ms, job.linger, job.fenced, job.cpu)
        return str(message.options.get(KEY_OPTION, "")), str(message.message_id)

    return send_dramatiq


def main(argv: list[str]) -> None:
    jobs = workload.load_plan(Path(argv[0]))
    index = int(argv[1])
    seed = int(workload.env("SEED"))
    ledger = workload.ledger_from_env()
    send = _sender()
    pace = float(workload.env("PACE", "0"))  # seconds between two sends
    for job in workload.producer_share(jobs, index, seed):
        while True:
            try:
                key, task_id = send(job)
                break
            except Exception as exc:  # a broker restarting: retry like a careful caller
                print(f"send of {job.key} failed ({exc!r}); retrying", file=sys.stderr)
                ledger.record("send_failed", key="", attempt=job.key, task_id=type(exc).__name__)
                time.sleep(RESEND_DELAY)
        # The guard's key (what the ledger's other entries carry) and the plan's name for it.
        ledger.record("submitted", key=key, attempt=job.key, task_id=task_id)
        if pace:
            time.sleep(pace)
    ledger.record("producer_done", key="", token=index)


if __name__ == "__main__":
    main(sys.argv[1:])
