"""Redis commands per task on the store's own server, for each path a task can take.

Every path runs through the real Celery adapter in this process: ``apply_async`` for the
enqueue side, and Celery's trace function (what a worker calls per message) for deliveries,
so the figures are the adapter's, not a hand-written sequence of store calls. The store has
a ``redis-server`` of its own, and each figure is an ``INFO commandstats`` delta divided by
the number of tasks. commandstats also counts the commands a Lua script runs (TIME, HMGET,
HSET, ...), so those are reported apart: a client sends EVALSHA once per script call, and
that, plus any plain command, is what a figure counts.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis
from celery.app.trace import build_tracer

from benchmarks.celery_app import build_app, close_app
from benchmarks.common import CommandDelta, Servers, command_calls, command_delta
from idemtask.celery import FINGERPRINT_HEADER, KEY_HEADER
from idemtask.celery.config import app_settings
from idemtask.guard import Attempt, Call
from idemtask.runtime import guard_for


def _delivery(task_id: str, key: Any) -> dict[str, Any]:
    """The request a worker builds for a message that carries the key in its headers."""
    headers = {KEY_HEADER: key.key, FINGERPRINT_HEADER: key.fingerprint}
    return {
        "id": task_id,
        "headers": headers,
        "retries": 0,
        "delivery_info": {"exchange": "", "routing_key": "bench", "priority": 0},
    }


def _summary(delta: CommandDelta, tasks: int) -> dict[str, Any]:
    return {
        "sent_per_task": delta.sent_total / tasks,
        "in_scripts_per_task": delta.in_scripts_total / tasks,
        "sent": delta.sent,
        "in_scripts": delta.in_scripts,
        "handshakes": delta.handshakes,
    }


def bench_commands(servers: Servers, tasks_per_path: int) -> dict[str, Any]:
    """Store commands per task: unique task, duplicate enqueue, cached replay, deferred
    duplicate; plus celery-once and celery-singleton for a unique task."""
    app, tasks = build_app(servers.broker_url, servers.backend_url, servers.store_url)
    store = redis.Redis.from_url(servers.store_url)
    idem_trace = build_tracer(tasks.idem.name, tasks.idem, app=app, hostname="bench")
    run = uuid.uuid4().hex[:12]
    n = tasks_per_path
    results: dict[str, Any] = {"tasks_per_path": n}
    handles: list[Any] = []
    try:
        # Connections made and scripts loaded before anything is counted.
        handles.append(tasks.idem.apply_async(("warm", 0)))
        warm = tasks.idem.idemtask_key(("warm", 0))
        idem_trace(handles[-1].id, ("warm", 0), {}, _delivery(handles[-1].id, warm))
        keys = [tasks.idem.idemtask_key((run, i)) for i in range(n)]

        # A unique task: reserve at enqueue, acquire and complete in the worker.
        before = command_calls(store)
        for i in range(n):
            handle = tasks.idem.apply_async((run, i))
            handles.append(handle)
            traced = idem_trace(handle.id, (run, i), {}, _delivery(handle.id, keys[i]))
            assert traced.retval == i, traced
        results["unique task"] = _summary(command_delta(before, command_calls(store)), n)

        # The same calls again: each is answered by the reserve script, nothing published.
        before = command_calls(store)
        for i in range(n):
            handle = tasks.idem.apply_async((run, i))
            assert handle.id == handles[i + 1].id
            handles.append(handle)
        results["duplicate enqueue"] = _summary(command_delta(before, command_calls(store)), n)

        # A second delivery of a completed key (a redelivery, a send_task by name): the
        # acquire script answers with the stored result, the body does not run.
        before = command_calls(store)
        for i in range(n):
            task_id = uuid.uuid4().hex
            traced = idem_trace(task_id, (run, i), {}, _delivery(task_id, keys[i]))
            assert traced.retval == i, traced
        results["cached replay"] = _summary(command_delta(before, command_calls(store)), n)

        # A delivery while another copy holds the key: acquire answers busy, the adapter
        # re-publishes the message with a delay (to the broker, not the store) and acks.
        guard = guard_for(app_settings(app))
        policy = tasks.idem.idemtask_policy()
        busy_run = uuid.uuid4().hex[:12]
        busy_keys = [tasks.idem.idemtask_key((busy_run, i)) for i in range(n)]
        holders = []
        for key in busy_keys:
            call = Call(tasks.idem.name, key.key, key.fingerprint)
            attempt = guard.begin(policy, call, uuid.uuid4().hex)
            assert isinstance(attempt, Attempt)
            holders.append(attempt)
        before = command_calls(store)
        for i, key in enumerate(busy_keys):
            task_id = uuid.uuid4().hex
            traced = idem_trace(task_id, (busy_run, i), {}, _delivery(task_id, key))
            assert traced.info is not None and traced.info.state == "IGNORED", traced
        results["deferred duplicate"] = _summary(command_delta(before, command_calls(store)), n)

        # The others, for comparison: one unique task each (lock at enqueue, unlock when done).
        for name, task in (("celery-once", tasks.once), ("celery-singleton", tasks.singleton)):
            trace = build_tracer(task.name, task, app=app, hostname="bench")
            handles.append(task.apply_async(("warm", 0)))
            trace(handles[-1].id, ("warm", 0), {}, {"id": handles[-1].id})
            before = command_calls(store)
            for i in range(n):
                handle = task.apply_async((run, i))
                handles.append(handle)
                trace(handle.id, (run, i), {}, {"id": handle.id})
            results[f"{name} unique task"] = _summary(
                command_delta(before, command_calls(store)), n
            )
    finally:
        handles.clear()
        close_app(app)
        store.close()
    return results
