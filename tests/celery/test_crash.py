"""Crashes, redeliveries and outages with real worker processes and real Redis servers.

Each test prints what it measured (body runs and guard decisions for the key), so a run with
``-s`` shows the numbers behind the assertions.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
import redis
from celery import Celery
from celery_support import running_worker, scanning_unacked, wait_for
from celery_testapp import decisions

from idemtask.errors import PoisonMessageError
from idemtask.store.base import State

from servers import RedisServer

pytestmark = [pytest.mark.celery, pytest.mark.slow]


def count(counter: redis.Redis, name: str) -> int:
    return int(counter.get(name) or 0)


def test_sigkill_mid_task_is_redelivered_and_completes_once(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    app = make_app()
    record = app.tasks["t.record"]
    key = record.idemtask_key(("kill", 3.0)).key
    worker_process()
    result = record.delay("kill", 3.0)
    pid = int(wait_for(lambda: counter.get("pid:kill"), 30, "the body to start"))
    os.kill(pid, signal.SIGKILL)
    assert result.get(timeout=60) == {"token": "kill", "done": 1}
    seen = decisions(counter, key)
    print(
        f"\nSIGKILL mid-task: body starts={count(counter, 'runs:kill')}, "
        f"completions={count(counter, 'done:kill')}, decisions={seen}"
    )
    assert count(counter, "runs:kill") == 2  # killed once, run again once
    assert count(counter, "done:kill") == 1
    assert seen["takeover"] == 1  # the second run took the dead attempt's lease over
    assert seen["completed"] == 1
    assert int(counter.get("pid:kill") or 0) != pid


def test_sigkill_after_completion_before_ack_replays(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    app = make_app()
    slow_ack = app.tasks["t.slow_ack"]
    key = slow_ack.idemtask_key(("ack",)).key
    worker_process()
    result = slow_ack.delay("ack")
    # SlowAckTask sleeps in the child after idemtask recorded the completion, before Celery
    # stores the result and acks: the message is still unacked.
    pid = int(wait_for(lambda: counter.get("acking:ack"), 30, "the body to finish"))
    stored = slow_ack._guard().store.inspect(key)
    assert stored is not None and stored.state is State.DONE
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: decisions(counter, key).get("replayed"), 30, "the redelivered copy")
    seen = decisions(counter, key)
    print(f"\nSIGKILL after completion: body runs={count(counter, 'runs:ack')}, decisions={seen}")
    assert count(counter, "runs:ack") == 1
    assert seen == {"new": 1, "acquired": 1, "completed": 1, "replayed": 1}
    assert result.get(timeout=30) == {"token": "ack", "pid": pid}  # the killed child's value


def test_a_task_that_kills_its_worker_every_time_is_poisoned(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    app = make_app()
    crashy = app.tasks["t.crashy"]
    key = crashy.idemtask_key(("oom",)).key
    worker_process()
    result = crashy.delay("oom")
    with pytest.raises(PoisonMessageError, match="poison"):
        result.get(timeout=60)
    seen = decisions(counter, key)
    print(
        f"\nkilled on every delivery (max_deliveries=2): body runs={count(counter, 'runs:oom')}, "
        f"decisions={seen}"
    )
    assert count(counter, "runs:oom") == 2  # then the loop stops
    assert seen["poison"] == 1
    stored = crashy._guard().store.inspect(key)
    assert stored is not None and stored.state is State.FAILED


def test_visibility_timeout_redelivery_defers_then_replays(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app(
        broker_transport_options={
            "visibility_timeout": 3,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        idemtask_conf={"lease": 1.5},
    )
    record = app.tasks["t.record"]
    key = record.idemtask_key(("vis", 7.0)).key
    with running_worker(app, concurrency=2), scanning_unacked(app):
        result = record.delay("vis", 7.0)
        assert result.get(timeout=60) == {"token": "vis", "done": 1}
        wait_for(lambda: decisions(counter, key).get("replayed"), 30, "a replayed copy")
    seen = decisions(counter, key)
    print(f"\nvisibility timeout: body runs={count(counter, 'runs:vis')}, decisions={seen}")
    assert count(counter, "runs:vis") == 1
    assert seen["acquired"] == 1
    assert seen["deferred"] >= 1  # the copy came while the first still ran, lease renewed
    assert seen["replayed"] >= 1
    assert "takeover" not in seen and "lease_lost" not in seen


def test_store_outage_loses_no_message_and_runs_each_once(
    make_app: Callable[..., Celery],
    fresh_redis: Callable[..., RedisServer],
    counter: redis.Redis,
) -> None:
    store = fresh_redis(appendonly=True)
    app = make_app(store_url=store.url, idemtask_conf={"lease": 6})
    record = app.tasks["t.record"]
    tokens = [f"o{i}" for i in range(6)]
    with running_worker(app, concurrency=2):
        results = [record.delay(token, 1.0) for token in tokens[:4]]
        wait_for(lambda: counter.get("runs:o0"), 30, "the first body")
        store.stop()
        outage = time.monotonic()
        # Published while the store is down: no reservation, the execute guard decides.
        results += [record.delay(token, 1.0) for token in tokens[4:]]
        duplicate = record.delay("o0", 1.0)
        time.sleep(2.5)
        store.start()
        print(f"\nstore outage lasted {time.monotonic() - outage:.1f}s")
        values = [result.get(timeout=90) for result in results]
        assert duplicate.get(timeout=90) == {"token": "o0", "done": 1}
    assert [value["token"] for value in values] == tokens
    runs = {token: count(counter, f"runs:{token}") for token in tokens}
    unavailable = sum(
        decisions(counter, record.idemtask_key((t, 1.0)).key).get("store_unavailable", 0)
        for t in tokens
    )
    print(f"store outage: body runs={runs}, store_unavailable decisions={unavailable}")
    assert runs == dict.fromkeys(tokens, 1)
    assert all(value["done"] == 1 for value in values)
    assert unavailable >= 1
