"""``idemtask.step`` in a real Celery prefork worker: a child SIGKILLed between step 2 and
step 3 is redelivered, the redelivery replays steps 1 and 2 and runs only step 3; a child
frozen between two steps while another delivery takes its key over defers its message, which
then replays the answer recorded by the delivery that took over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery_steps_app import build_steps_app
from celery_support import HERE, ROOT, Urls, wait_for
from celery_testapp import decisions

from idemtask.store import RedisStore
from idemtask.store.base import State

from servers import terminate_session

pytestmark = [pytest.mark.celery, pytest.mark.slow]


@pytest.fixture
def steps_worker(urls: Urls, tmp_path: Path) -> Iterator[Callable[[], Path]]:
    """``celery -A celery_steps_app worker --pool=prefork``; returns the log's path."""
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "steps-worker.log"

    def start() -> Path:
        env = dict(os.environ)
        env.update(
            ITEST_BROKER=urls.broker,
            ITEST_BACKEND=urls.backend,
            ITEST_STORE=urls.store,
            ITEST_COUNTER=urls.counter,
            PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")]),
        )
        command = [
            *(sys.executable, "-m", "celery", "-A", "celery_steps_app", "worker"),
            *("--pool=prefork", "-c", "2", "--loglevel=INFO", "--without-gossip"),
            *("--without-mingle", "--without-heartbeat", f"--logfile={log}"),
        ]
        procs.append(subprocess.Popen(command, env=env, cwd=HERE, start_new_session=True))
        wait_for(lambda: log.exists() and "ready." in log.read_text(), 30, "worker")
        return log

    yield start
    for proc in procs:
        terminate_session(proc, grace=0)  # the test is over: no warm shutdown


@pytest.fixture
def steps_app(urls: Urls, request: pytest.FixtureRequest) -> Iterator[Celery]:
    app = build_steps_app(
        request.node.name,
        broker_url=urls.broker,
        backend_url=urls.backend,
        store_url=urls.store,
        counter_url=urls.counter,
    )
    yield app
    pending = getattr(app.backend, "_pending_results", None)
    if pending is not None:
        pending.concrete.clear()
    app.close()


def test_a_child_killed_after_step_two_resumes_at_step_three(
    steps_app: Celery, steps_worker: Callable[[], Path], counter: redis.Redis, urls: Urls
) -> None:
    checkout = steps_app.tasks["s.checkout"]
    key = checkout.idemtask_key(("o1",)).key
    steps_worker()
    result = checkout.delay("o1")
    assert result.get(timeout=60) == {"reserve": 1, "charge": 1, "write": 1}
    effects = {s: int(counter.get(f"effect:o1:{s}") or 0) for s in ("reserve", "charge", "write")}
    seen = decisions(counter, key)
    runs = int(counter.get("runs:o1") or 0)
    print(f"\nsteps after SIGKILL: runs={runs} effects={effects} decisions={seen}")
    assert runs == 2  # the killed child's run and the redelivered one
    assert effects == {"reserve": 1, "charge": 1, "write": 1}  # 1 and 2 replayed, 3 ran once
    assert seen["takeover"] == 1 and seen["completed"] == 1
    store = RedisStore.from_url(urls.store)
    record = store.inspect(key)
    store.client.close()
    assert record is not None and record.state is State.DONE
    assert sorted(record.steps) == ["charge", "reserve", "write"]


def test_a_step_after_a_takeover_defers_instead_of_failing(
    steps_app: Celery, steps_worker: Callable[[], Path], counter: redis.Redis, urls: Urls
) -> None:
    """The frozen holder's next step finds its lease taken over and raises LeaseLostError:
    its message must not end as FAILURE (a second answer for the key) but be deferred, like
    a stale completion, and get the value the delivery that took over recorded."""
    paused = steps_app.tasks["s.paused"]
    key = paused.idemtask_key(("p1",)).key
    steps_worker()
    first = paused.delay("p1")
    wait_for(lambda: counter.llen("pids:p1") == 1, 30, "the first body to pass step 1")
    holder = int(counter.lindex("pids:p1", 0) or 0)
    os.kill(holder, signal.SIGSTOP)  # its lease keeper stops with it
    try:
        copy = steps_app.send_task("s.paused", args=("p1",))
        # Deferred while the lease runs, then it takes the key over and completes.
        answer = copy.get(timeout=60)
    finally:
        counter.set("resumed:p1", 1)
        os.kill(holder, signal.SIGCONT)
    assert answer["reserve"] == 1  # step 1 replayed from the frozen holder's record
    assert first.get(timeout=60) == answer
    assert first.state == "SUCCESS"
    seen = decisions(counter, key)
    print(f"\nstale step: runs={counter.get('runs:p1')} decisions={seen}")
    assert seen["takeover"] == 1 and seen["completed"] == 1 and seen["replayed"] >= 1
    assert int(counter.get("effect:p1:reserve") or 0) == 1
