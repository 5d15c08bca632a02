"""The Celery app the tests run: built in-process by ``build_app``, or, for worker
subprocesses (``celery -A celery_testapp worker``), from ``ITEST_*`` environment variables.

Task bodies count their runs with INCR in a separate Redis database (``counter_url``), apart
from idemtask's records. Every idemtask decision is counted there too, per key, so tests can
read how many deliveries were deferred, replayed or taken over, even in worker processes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import redis
from celery import Celery

import idemtask
from idemtask.celery import IdempotentTask, presets
from idemtask.events import Decision, Event, add_observer

_counter: dict[str, redis.Redis] = {}


def counter() -> redis.Redis:
    return _counter["client"]


def _count_decision(event: Event) -> None:
    client = _counter.get("client")
    if client is not None:
        client.incr(f"decision:{event.decision.value}:{event.key}")
        if event.decision is Decision.DEFERRED:
            carried = json.dumps([event.fields.get("deferrals"), event.fields.get("delay")])
            client.rpush(f"deferrals:{event.task_id}", carried)


def deferrals(client: redis.Redis, task_id: str) -> list[tuple[int, float]]:
    """Each deferral of the message ``task_id``, in order: (count carried, delay)."""
    return [tuple(json.loads(item)) for item in client.lrange(f"deferrals:{task_id}", 0, -1)]


add_observer(_count_decision)


def decisions(client: redis.Redis, key: str) -> dict[str, int]:
    """Every decision counted for ``key``: {"acquired": 1, "replayed": 2, ...}."""
    found: dict[str, int] = {}
    for name in client.scan_iter(match=f"decision:*:{key}"):
        text = name.decode() if isinstance(name, bytes) else str(name)
        found[text.split(":")[1]] = int(client.get(name) or 0)
    return found


class SlowAckTask(IdempotentTask):
    """Sleeps after idemtask recorded the completion and before Celery stores the result and
    acks: the window in which a crash leaves a finished task unacked and unrecorded by
    Celery (a kill after Celery stored SUCCESS is already acked by Celery 5.7 itself). Only
    the first copy sleeps (SET NX), so the redelivered copy finishes normally."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        value = super().__call__(*args, **kwargs)
        if counter().set(f"acking:{args[0]}", os.getpid(), nx=True):
            time.sleep(60)
        return value


def build_app(
    name: str,
    *,
    broker_url: str,
    backend_url: str,
    store_url: str | None,
    counter_url: str,
    idemtask_conf: dict[str, Any] | None = None,
    visibility_timeout: float = 30,
    **conf: Any,
) -> Celery:
    _counter["client"] = redis.Redis.from_url(counter_url)
    app = Celery(name, broker=broker_url, backend=backend_url, task_cls=IdempotentTask)
    presets.apply(app, visibility_timeout=visibility_timeout)
    settings: dict[str, Any] = {"lease": 2, "result_ttl": 600, "wait_timeout": 5}
    if store_url is not None:
        settings["redis_url"] = store_url
    settings.update(idemtask_conf or {})
    app.conf.update(
        idemtask=settings,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_retry_delay=1,
        **conf,
    )
    # An in-process worker's stop waits for its BRPOP in flight, which kombu sends with a 1 s
    # server-side timeout: a second of every such stop in this suite. Polling every 0.1 s
    # changes nothing else (a message pushed is taken at once either way).
    app.conf.broker_transport_options = {
        "polling_interval": 0.1,
        **(app.conf.broker_transport_options or {}),
    }
    _register(app)
    _register_fault_tasks(app)
    return app


def _register(app: Celery) -> None:
    @app.task(shared=False, name="t.record")
    def record(token: str, sleep: float = 0.0) -> dict[str, Any]:
        client = counter()
        client.incr(f"runs:{token}")
        client.set(f"pid:{token}", os.getpid())
        if sleep:
            time.sleep(sleep)
        done = client.incr(f"done:{token}")
        return {"token": token, "done": done}

    @app.task(shared=False, name="t.add")
    def add(x: int, y: int) -> int:
        counter().incr(f"runs:add:{x}:{y}")
        return x + y

    @app.task(shared=False, name="t.total", idempotent=False)
    def total(values: list[int]) -> int:
        return sum(values)

    @app.task(shared=False, name="t.sum_all")
    def sum_all(values: list[int]) -> int:
        counter().incr(f"runs:sum_all:{sum(values)}")
        return sum(values)

    @app.task(shared=False, name="t.nan", idempotent=False)
    def nan() -> float:
        return float("nan")

    @app.task(shared=False, name="t.pair")
    def pair(x: int) -> tuple[int, str]:
        counter().incr(f"runs:pair:{x}")
        return (x, "tuple")

    @app.task(shared=False, bind=True, name="t.flaky", max_retries=5)
    def flaky(self: Any, token: str, failures: int) -> int:
        run = counter().incr(f"runs:{token}")
        if run <= failures:
            raise self.retry(countdown=0.2)
        return run

    @app.task(
        shared=False,
        name="t.auto_flaky",
        autoretry_for=(ValueError,),
        retry_kwargs={"countdown": 0.2, "max_retries": 5},
    )
    def auto_flaky(token: str, failures: int) -> int:
        run = counter().incr(f"runs:{token}")
        if run <= failures:
            raise ValueError(f"failure {run}")
        return run

    @app.task(shared=False, bind=True, name="t.fenced")
    def fenced(self: Any, token: str) -> dict[str, Any]:
        counter().incr(f"runs:{token}")
        execution = idemtask.current()
        return {
            "task_id": self.request.id,
            "execution_task_id": execution.task_id,
            "fencing_token": execution.fencing_token,
            "key": execution.key,
        }

    @app.task(shared=False, name="t.charge", idempotency_key=("order_id",))
    def charge(order_id: str, amount: int) -> int:
        counter().incr(f"runs:charge:{order_id}")
        return amount

    @app.task(shared=False, name="t.by_customer", idempotency_key=lambda customer, note: customer)
    def by_customer(customer: str, note: str) -> str:
        counter().incr(f"runs:customer:{customer}")
        return note

    @app.task(shared=False, name="t.plain", idempotent=False)
    def plain(token: str) -> int:
        return int(counter().incr(f"runs:{token}"))

    @app.task(shared=False, name="t.terminal", terminal_exceptions=(LookupError,))
    def terminal(token: str) -> None:
        counter().incr(f"runs:{token}")
        raise KeyError(token)

    @app.task(shared=False, name="t.crashy", max_deliveries=2)
    def crashy(token: str) -> None:
        counter().incr(f"runs:{token}")
        os.kill(os.getpid(), signal.SIGKILL)  # dies on every delivery, like an OOM kill

    @app.task(shared=False, base=SlowAckTask, name="t.slow_ack")
    def slow_ack(token: str) -> dict[str, Any]:
        client = counter()
        client.incr(f"runs:{token}")
        return {"token": token, "pid": os.getpid()}


def _register_fault_tasks(app: Celery) -> None:
    """Tasks for the Celery API paths that must behave as on a plain task."""

    @app.task(shared=False, bind=True, name="t.forwarding")
    def forwarding(self: Any, token: str) -> list[str]:
        # A correlation id passed on the common way: every header of the parent's request.
        counter().incr(f"runs:forwarding:{token}")
        child = app.tasks["t.record"].apply_async((f"{token}-child",), headers=self.request.headers)
        named = app.send_task("t.record", args=(f"{token}-named",), headers=self.request.headers)
        return [child.id, named.id]

    @app.task(shared=False, bind=True, name="t.replaced")
    def replaced(self: Any, token: str) -> Any:
        counter().incr(f"runs:replaced:{token}")
        return self.replace(app.tasks["t.record"].s(f"{token}-r"))

    @app.task(shared=False, bind=True, name="t.soft_retry", max_retries=3)
    def soft_retry(self: Any, token: str) -> int:
        client = counter()
        run = int(client.incr(f"runs:{token}"))
        if client.incr(f"active:{token}") > 1:
            client.set(f"overlap:{token}", 1)  # two bodies of one key at once
        try:
            if run == 1:
                self.retry(countdown=0, throw=False)
                time.sleep(1.5)  # the body goes on after publishing its retry
            return run
        finally:
            client.decr(f"active:{token}")

    @app.task(shared=False, bind=True, name="t.returns_retry", max_retries=3)
    def returns_retry(self: Any, token: str) -> Any:
        run = int(counter().incr(f"runs:{token}"))
        if run == 1:
            return self.retry(countdown=0.2, throw=False)
        return f"run {run}"

    @app.task(shared=False, name="t.unencodable")
    def unencodable(token: str) -> object:
        counter().incr(f"runs:{token}")
        return object()

    @app.task(shared=False, name="t.oversized", max_result_bytes=64)
    def oversized(token: str) -> str:
        counter().incr(f"runs:{token}")
        return "x" * 1000


def _from_environment() -> Celery | None:
    broker = os.environ.get("ITEST_BROKER")
    if not broker:
        return None
    return build_app(
        "itest",
        broker_url=broker,
        backend_url=os.environ["ITEST_BACKEND"],
        store_url=os.environ["ITEST_STORE"],
        counter_url=os.environ["ITEST_COUNTER"],
        visibility_timeout=float(os.environ.get("ITEST_VISIBILITY", "30")),
    )


app = _from_environment()
