"""The Celery test app plus a task whose body runs three steps (``idemtask.step``) and, on
its first run only, SIGKILLs its prefork child after step 2 is recorded; and one whose first
run waits between its two steps, for the test to freeze it while another delivery takes its
key over.

Built in-process by ``build_steps_app``, or for worker subprocesses (``celery -A
celery_steps_app worker``) from the same ``ITEST_*`` variables as ``celery_testapp``. Each
step's effect is counted in the counter database.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from celery import Celery
from celery_testapp import build_app, counter

import idemtask

STEPS = ("reserve", "charge", "write")


def build_steps_app(name: str, **options: Any) -> Celery:
    app = build_app(name, **options)

    def effect(order: str, step: str) -> int:
        return int(counter().incr(f"effect:{order}:{step}"))

    @app.task(shared=False, name="s.checkout")
    def checkout(order: str) -> dict[str, int]:
        client = counter()
        client.incr(f"runs:{order}")
        client.set(f"pid:{order}", os.getpid())
        values = {}
        for step in STEPS:
            values[step] = idemtask.step(step, effect, order, step)
            if step == "charge" and client.incr(f"kill:{order}") == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # after step 2's effect is recorded
        return values

    @app.task(shared=False, name="s.paused")
    def paused(order: str) -> dict[str, int]:
        client = counter()
        run = int(client.incr(f"runs:{order}"))
        values = {"reserve": idemtask.step("reserve", effect, order, "reserve")}
        if run == 1:
            client.rpush(f"pids:{order}", os.getpid())
            deadline = time.monotonic() + 60
            while not client.get(f"resumed:{order}") and time.monotonic() < deadline:
                time.sleep(0.05)  # the test freezes this process here, then resumes it
        values["charge"] = idemtask.step("charge", effect, order, "charge")
        return values

    return app


def _from_environment() -> Celery | None:
    broker = os.environ.get("ITEST_BROKER")
    if not broker:
        return None
    return build_steps_app(
        "itest-steps",
        broker_url=broker,
        backend_url=os.environ["ITEST_BACKEND"],
        store_url=os.environ["ITEST_STORE"],
        counter_url=os.environ["ITEST_COUNTER"],
        visibility_timeout=float(os.environ.get("ITEST_VISIBILITY", "30")),
    )


app = _from_environment()
