"""Execute side: whoever published a message, the body runs at most once per key and later
deliveries get the stored result through Celery's normal success path."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery, chain, chord
from celery_support import WorkerProcess, running_worker, wait_for
from celery_testapp import decisions

from idemtask.celery import validate_app
from idemtask.errors import ConfigurationError, KeyDerivationError, TaskFailedError

from servers import free_port

pytestmark = pytest.mark.celery


def runs(counter: redis.Redis, name: str) -> int:
    return int(counter.get(f"runs:{name}") or 0)


def test_send_task_by_name_is_guarded_at_execute(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app()
    record = app.tasks["t.record"]
    key = record.idemtask_key(("s",)).key
    with running_worker(app):
        # send_task skips apply_async: no reservation, no header; the worker derives the key.
        first = app.send_task("t.record", args=("s",))
        assert first.get(timeout=20) == {"token": "s", "done": 1}
        second = app.send_task("t.record", kwargs={"token": "s", "sleep": 0})
        assert second.id != first.id
        assert second.get(timeout=20) == {"token": "s", "done": 1}  # replayed, own id
    assert runs(counter, "s") == 1
    assert decisions(counter, key) == {"acquired": 1, "completed": 1, "replayed": 1}


def test_replayed_value_equals_a_normal_result(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app()
    with running_worker(app):
        first = app.tasks["t.pair"].apply_async((3,), task_id="pair-first")
        value = first.get(timeout=20)
        replay = app.send_task("t.pair", args=(3,))
        assert replay.get(timeout=20) == value == [3, "tuple"]  # JSON: the tuple is a list
    assert runs(counter, "pair:3") == 1


def test_chain_and_chord_with_replayed_members_complete(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app()
    add, total, sum_all = app.tasks["t.add"], app.tasks["t.total"], app.tasks["t.sum_all"]
    with running_worker(app):
        assert add.delay(1, 2).get(timeout=20) == 3
        # add(1, 2) is replayed inside the chain; add(3, 4) runs; the chain goes on.
        flow = chain(add.s(1, 2), add.s(4)).apply_async()
        assert flow.get(timeout=20) == 7
        assert flow.parent.get(timeout=20) == 3
        # A chord whose header holds replayed and new members still fires its body.
        result = chord([add.s(1, 2), add.s(3, 4), add.s(5, 6)], total.s()).apply_async()
        assert result.get(timeout=30) == 3 + 7 + 11
        # A chord body that duplicates a finished call (it carries group_id, so it passes
        # enqueue) is replayed under its own id, and the chord completes.
        assert sum_all.delay([3, 7, 11]).get(timeout=20) == 21
        header = [add.s(1, 2), add.s(3, 4), add.s(5, 6)]
        assert chord(header, sum_all.s()).apply_async().get(timeout=30) == 21
    assert runs(counter, "add:1:2") == 1
    assert runs(counter, "add:3:4") == 1
    assert runs(counter, "add:5:6") == 1
    assert runs(counter, "sum_all:21") == 1


def test_an_unkeyable_chain_step_fails_visibly(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app()
    nan, record = app.tasks["t.nan"], app.tasks["t.record"]
    with running_worker(app):
        # The worker sends record(NaN) as the next step: it is published (not refused in
        # the worker's dispatch), and fails at execute with the key error.
        flow = chain(nan.s(), record.s()).apply_async()
        with pytest.raises(KeyDerivationError, match=r"(?i)nan"):
            flow.get(timeout=20)
    assert runs(counter, "nan") == 0


def test_a_frozen_task_id_is_published_and_replayed(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app()
    record = app.tasks["t.record"]
    with running_worker(app):
        first = record.delay("frozen").get(timeout=20)
        signature = record.s("frozen")
        frozen_id = signature.freeze().id  # someone may already wait on this id
        result = signature.apply_async()
        assert result.id == frozen_id
        assert result.get(timeout=20) == first
    assert runs(counter, "frozen") == 1


def test_retry_reenters_and_success_is_final(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app()
    flaky, auto = app.tasks["t.flaky"], app.tasks["t.auto_flaky"]
    with running_worker(app):
        assert flaky.delay("retry", 2).get(timeout=30) == 3
        assert auto.delay("auto", 2).get(timeout=30) == 3
        # After success, neither a duplicate call nor a message by name runs the body.
        assert flaky.delay("retry", 2).get(timeout=20) == 3
        assert app.send_task("t.auto_flaky", args=("auto", 2)).get(timeout=20) == 3
    assert runs(counter, "retry") == 3
    assert runs(counter, "auto") == 3
    key = flaky.idemtask_key(("retry", 2)).key
    seen = decisions(counter, key)
    assert seen["acquired"] == 3 and seen["released"] == 2 and seen["completed"] == 1
    assert "deferred" not in seen  # the key was given back before each retry was published


def test_terminal_failures_are_replayed_not_rerun(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app()
    terminal = app.tasks["t.terminal"]
    with running_worker(app):
        with pytest.raises(KeyError):
            terminal.delay("term").get(timeout=20)
        again = app.send_task("t.terminal", args=("term",))
        # Celery rebuilds the error in the caller as the same class, with the stored text.
        with pytest.raises(TaskFailedError, match="failed terminally: KeyError"):
            again.get(timeout=20)
    assert runs(counter, "term") == 1


def test_bound_task_sees_request_and_fencing_token(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app()
    fenced = app.tasks["t.fenced"]
    with running_worker(app):
        result = fenced.delay("f")
        value = result.get(timeout=20)
    assert value["task_id"] == value["execution_task_id"] == result.id
    assert value["key"] == fenced.idemtask_key(("f",)).key
    assert value["fencing_token"] >= 1


def test_direct_calls_run_unguarded(make_app: Callable[..., Celery], counter: redis.Redis) -> None:
    app = make_app()
    record = app.tasks["t.record"]
    assert record("d") == {"token": "d", "done": 1}
    assert record("d") == {"token": "d", "done": 2}
    assert record._guard().store.inspect(record.idemtask_key(("d",)).key) is None


def test_eager_mode_dedupes_and_replays(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app(task_always_eager=True)
    record, flaky, add = app.tasks["t.record"], app.tasks["t.flaky"], app.tasks["t.add"]
    first = record.delay("eager")
    second = record.delay("eager")
    assert second.id == first.id
    assert first.get() == second.get() == {"token": "eager", "done": 1}
    # Eager canvas skips apply_async: the execute guard replays inside the chain.
    assert chain(add.s(2, 2), add.s(1)).apply_async().get() == 5
    assert chain(add.s(2, 2), add.s(1)).apply_async().get() == 5
    # An eager retry runs inside the failing attempt: its key is given back first.
    assert flaky.delay("eager-retry", 1).get() == 2
    assert flaky.delay("eager-retry", 1).get() == 2
    assert runs(counter, "eager") == 1
    assert runs(counter, "add:2:2") == 1
    assert runs(counter, "add:4:1") == 1
    assert runs(counter, "eager-retry") == 2


def test_eager_mode_with_the_memory_store(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app(task_always_eager=True, store_url=None)
    record = app.tasks["t.record"]
    assert record.delay("mem").id == record.delay("mem").id
    assert runs(counter, "mem") == 1


def test_on_running_raise_and_drop(make_app: Callable[..., Celery], counter: redis.Redis) -> None:
    app = make_app(idemtask_conf={"on_running": "raise", "dedupe_enqueue": False})
    record = app.tasks["t.record"]
    with running_worker(app, concurrency=2):
        slow = record.delay("busy", 1.5)
        wait_for(lambda: counter.get("runs:busy"), what="first run")
        second = record.delay("busy", 1.5)
        with pytest.raises(Exception, match="is running as task"):
            second.get(timeout=20)
        assert slow.get(timeout=20)["done"] == 1
    assert runs(counter, "busy") == 1

    app = make_app(idemtask_conf={"on_running": "drop", "dedupe_enqueue": False})
    record = app.tasks["t.record"]
    with running_worker(app, concurrency=2):
        slow = record.delay("drop", 1.5)
        wait_for(lambda: counter.get("runs:drop"), what="first run")
        dropped = record.delay("drop", 1.5)
        assert slow.get(timeout=20)["done"] == 1
        key = record.idemtask_key(("drop", 1.5)).key
        wait_for(lambda: decisions(counter, key).get("dropped"), what="drop")
        assert dropped.state == "STARTED"  # acked without a stored outcome
    assert runs(counter, "drop") == 1


def test_invalid_options_stop_the_worker(make_app: Callable[..., Celery]) -> None:
    app = make_app()

    @app.task(shared=False, name="t.bad", idempotency_key=("missing",))
    def bad(order_id: str) -> None: ...

    @app.task(shared=False, name="t.bad2", on_running="sometimes")
    def bad2() -> None: ...

    with pytest.raises(ConfigurationError, match=r"t.bad.*missing(?s:.*)on_running"):
        validate_app(app)
    with pytest.raises(SystemExit, match="idemtask"), running_worker(app):
        pass


def test_memory_store_warns_at_worker_start(
    make_app: Callable[..., Celery], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(store_url=None)
    with caplog.at_level(logging.WARNING, logger="idemtask.celery"), running_worker(app):
        pass
    assert "MemoryStore guards nothing across worker processes" in caplog.text


def test_a_worker_warns_once_at_start_when_the_store_cannot_be_reached(
    worker_process: Callable[..., WorkerProcess],
) -> None:
    """A prefork worker whose store does not answer says so once, in its own log, with the
    URL's password redacted (its guarded tasks are deferred until the store answers)."""
    worker = worker_process(store_url=f"redis://:hunter2-pw@127.0.0.1:{free_port()}/1")
    wait_for(lambda: "cannot reach the store" in worker.text(), 20, "the start-up warning")
    time.sleep(1)  # every process has started: no second warning comes later
    text = worker.text()
    assert text.count("cannot reach the store") == 1, text
    assert "redis://:***@127.0.0.1:" in text
    assert "hunter2-pw" not in text


def test_a_worker_with_invalid_options_says_so_once_and_does_not_start(tmp_path: Path) -> None:
    """``celery worker`` on an app with two bad tasks exits with one message listing both."""
    (tmp_path / "badopts_app.py").write_text(
        "from celery import Celery\n"
        "from idemtask.celery import IdempotentTask\n"
        "app = Celery('bad', broker='memory://', task_cls=IdempotentTask)\n"
        "app.conf.idemtask = {'redis_url': 'memory://'}\n"
        "@app.task(name='t.bad', idempotency_key=('missing',))\n"
        "def bad(order_id): ...\n"
        "@app.task(name='t.bad2', on_running='sometimes')\n"
        "def bad2(): ...\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "badopts_app", "worker", "--pool=solo"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert output.count("invalid idemtask configuration") == 1, output
    assert "t.bad" in output and "on_running" in output, output
