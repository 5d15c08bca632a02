"""Delivery behaviour on real brokers: RedisBroker and RabbitmqBroker, worker processes killed
with SIGKILL mid-message, and the store's Redis stopped while messages run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries
from dramatiq.results import ResultFailure, Results
from dramatiq.results.backends import RedisBackend
from dramatiq_helpers import wait_for

from idemtask.dramatiq import IdempotencyMiddleware
from idemtask.dramatiq.middleware import KEY_OPTION
from idemtask.guard import MAX_BUSY_DELAY, busy_delay
from idemtask.store.base import State

pytestmark = pytest.mark.dramatiq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: Measured counts of each crash test are printed (``-s`` shows them) and, when this
#: variable names a file, appended to it as JSON lines.
OBSERVATIONS = os.environ.get("IDT_OBSERVATIONS", "")


def _observe(observed: dict[str, Any]) -> None:
    print(observed)
    if OBSERVATIONS:
        with open(OBSERVATIONS, "a") as out:
            out.write(json.dumps(observed) + "\n")


class Workers:
    """Worker processes of ``dramatiq_crash_app`` on one broker/namespace."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.counters = redis.Redis.from_url(env["IDT_COUNTER_URL"])
        self.log = open(  # noqa: SIM115 - closed in close()
            Path(os.environ.get("TMPDIR", "/tmp")) / f"{env['IDT_NAMESPACE']}.log", "wb"
        )

    def start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "dramatiq_crash_app.py")],
            env={**os.environ, **self.env, "PYTHONPATH": str(ROOT)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        ready = f"{self.env['IDT_NAMESPACE']}:ready:{proc.pid}"
        wait_for(lambda: proc.poll() is None and self.counters.exists(ready), 60, "worker up")
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.counters.close()
        self.log.close()


@pytest.fixture
def crash_app(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., tuple[Any, Workers]]]:
    made: list[Workers] = []
    apps: list[Any] = []

    def make(broker: str, broker_url: str, *, lease: float = 3.0) -> tuple[Any, Workers]:
        base = redis_url.rsplit("/", 1)[0]
        env = {
            "IDT_BROKER": broker,
            "IDT_BROKER_URL": broker_url,
            "IDT_NAMESPACE": f"c{uuid.uuid4().hex[:10]}",
            "IDT_STORE_URL": f"{base}/1",
            "IDT_COUNTER_URL": f"{base}/15",
            "IDT_LEASE": str(lease),
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        import dramatiq_crash_app

        app = dramatiq_crash_app.build()
        apps.append(app)
        workers = Workers(env)
        made.append(workers)
        return app, workers

    yield make
    for workers in made:
        workers.close()
    for app in apps:
        app.broker.close()
        app.counters.close()


def _crash_and_recover(app: Any, workers: Workers, label: str) -> dict[str, Any]:
    first = workers.start()
    message = app.job.send("j1", 60.0)
    duplicate = app.job.send("j1", 60.0)
    assert duplicate.message_id == message.message_id
    wait_for(lambda: app.count("started:j1") == first.pid, 30, "first run started")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    killed_at = time.monotonic()
    workers.start()
    wait_for(lambda: app.count("effects:j1") == 1, 60, "redelivered run finished")
    recovered = time.monotonic() - killed_at
    assert message.get_result(block=True, timeout=10_000) == "done j1"
    # a stray copy of the completed message is replayed, not run
    app.broker.enqueue(message)
    wait_for(lambda: app.count("decision:replayed") >= 1, 30, "replay")
    time.sleep(0.3)
    observed = {
        "test": label,
        "body_runs": app.count("runs:j1"),
        "effects": app.count("effects:j1"),
        "recovered_after_s": round(recovered, 2),
        **{
            d: app.count(f"decision:{d}")
            for d in ("acquired", "takeover", "busy", "deferred", "replayed", "completed")
        },
    }
    _observe(observed)
    assert observed["body_runs"] == 2  # the killed run and the redelivered one
    assert observed["effects"] == 1  # completed exactly once
    assert observed["completed"] == 1
    assert observed["replayed"] == 1
    assert observed["acquired"] == 1  # the first worker, killed mid-body
    assert observed["takeover"] == 1  # the second worker took the dead attempt's key over
    return observed


@pytest.mark.slow
def test_redis_worker_killed_mid_message(crash_app, redis_url) -> None:
    app, workers = crash_app("redis", redis_url.rsplit("/", 1)[0] + "/2")
    _crash_and_recover(app, workers, "redis SIGKILL")


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_rabbitmq_worker_killed_mid_message(crash_app, rabbitmq_server) -> None:
    app, workers = crash_app("rabbitmq", rabbitmq_server.url)
    _crash_and_recover(app, workers, "rabbitmq SIGKILL")


@pytest.mark.rabbitmq
def test_rabbitmq_duplicate_send_delayed_and_canvas(crash_app, rabbitmq_server) -> None:
    app, workers = crash_app("rabbitmq", rabbitmq_server.url)
    workers.start()
    delayed = app.job.send_with_options(args=("d1",), delay=300)
    assert app.job.send("d1").message_id == delayed.message_id
    assert delayed.get_result(block=True, timeout=20_000) == "done d1"
    group = dramatiq.group([app.job.message("d1"), app.job.message("g2")]).run()
    assert sorted(group.get_results(block=True, timeout=20_000)) == ["done d1", "done g2"]
    assert (app.count("runs:d1"), app.count("runs:g2")) == (1, 1)
    assert app.count("decision:replayed") == 1


def test_redis_group_of_identical_calls_defers_on_the_schedule(crash_app, redis_url) -> None:
    """A group of one call four times: one runs (holding 1 s), each copy is deferred on
    ``busy_delay``'s schedule, carrying its count, and replays the holder's value."""
    lease, hold = 3.0, 1.0
    app, workers = crash_app("redis", redis_url.rsplit("/", 1)[0] + "/2", lease=lease)
    workers.start()
    messages = [app.job.message("grp", hold) for _ in range(4)]
    group = dramatiq.group(messages).run()
    assert list(group.get_results(block=True, timeout=30_000)) == ["done grp"] * 4
    assert app.count("runs:grp") == 1
    assert app.count("decision:acquired") == 1 and app.count("decision:replayed") == 3
    # Each deferral waits at least its delay and a copy back after the holder ended
    # replays: 0.05 + 0.1 + 0.2 + 0.25 + 0.25 < 1.0 s, so six deferrals at most.
    bound, waited = 1, 0.0
    while waited + busy_delay(bound - 1, lease) < hold:
        waited += busy_delay(bound - 1, lease)
        bound += 1
    assert bound == 6
    steps = {m.message_id: app.deferrals(m.message_id) for m in messages}
    for found in steps.values():
        assert len(found) <= bound, steps
        assert [count for count, _ in found] == list(range(1, len(found) + 1))
        delays = [delay for _, delay in found]
        assert delays == [busy_delay(n, lease) for n in range(len(found))]
        assert delays == sorted(delays) and all(d <= MAX_BUSY_DELAY for d in delays)
    assert sum(1 for found in steps.values() if found) >= 1, steps
    assert app.count("decision:deferred") == sum(len(found) for found in steps.values())


@pytest.fixture
def redis_broker_env(
    redis_url: str,
) -> Iterator[Callable[..., tuple[RedisBroker, IdempotencyMiddleware, redis.Redis]]]:
    made: list[tuple[RedisBroker, redis.Redis]] = []
    base = redis_url.rsplit("/", 1)[0]

    def make(store_url: str, **settings: Any) -> tuple[RedisBroker, IdempotencyMiddleware, Any]:
        namespace = f"b{uuid.uuid4().hex[:10]}"
        broker = RedisBroker(url=f"{base}/3", namespace=namespace)
        counters = redis.Redis.from_url(f"{base}/15")
        broker.add_middleware(Results(backend=RedisBackend(client=counters, namespace=namespace)))
        middleware = IdempotencyMiddleware(redis_url=store_url, key_prefix=namespace, **settings)
        broker.add_middleware(middleware, before=Retries)
        dramatiq.set_broker(broker)
        made.append((broker, counters))
        return broker, middleware, counters

    yield make
    for broker, counters in made:
        broker.close()
        counters.close()


def test_redis_broker_duplicates_retries_and_pipeline(redis_broker_env, redis_url) -> None:
    broker, middleware, counters = redis_broker_env(redis_url.rsplit("/", 1)[0] + "/1")

    @dramatiq.actor(idempotent=True, store_results=True, min_backoff=10, max_backoff=20)
    def flaky(x: int) -> int:
        if counters.incr(f"flaky:{x}") == 1:
            raise ConnectionError("blip")
        return x + 100

    @dramatiq.actor(store_results=True)
    def half(x: int) -> float:
        return x / 2

    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        message = flaky.send(1)
        assert flaky.send(1).message_id == message.message_id
        assert message.get_result(block=True, timeout=20_000) == 101
        pipe = dramatiq.pipeline([flaky.message(1), half.message()]).run()
        assert pipe.get_result(block=True, timeout=20_000) == 50.5
        assert int(counters.get("flaky:1")) == 2  # one failure, one success, then replays
        record = middleware.guard.store.inspect(message.options[KEY_OPTION])
        assert record is not None and record.state is State.DONE
    finally:
        worker.stop()


COUNT = 10


@pytest.mark.slow
def test_store_stopped_during_a_run_loses_nothing(
    redis_broker_env, redis_url, fresh_redis, decisions
) -> None:
    """One body runs across the outage; messages (and duplicates) sent while the store is
    down are published unreserved, deferred by the worker, and run once after it returns."""
    store = fresh_redis(appendonly=True)
    broker, middleware, counters = redis_broker_env(store.url, lease=10)
    prefix = f"s{uuid.uuid4().hex[:6]}"

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=0)
    def step(n: int, hold: float = 0.1) -> int:
        counters.incr(f"{prefix}:runs:{n}")
        time.sleep(hold)
        return n * n

    worker = dramatiq.Worker(broker, worker_threads=3, worker_timeout=100)
    worker.start()
    try:
        held = step.send(0, 2.5)
        wait_for(lambda: counters.get(f"{prefix}:runs:0") is not None, 10, "held run")
        store.stop()
        stopped = time.monotonic()
        messages = [step.send(n) for n in range(1, COUNT)]
        duplicates = [step.send(1), step.send(2)]  # cannot be deduplicated at enqueue now
        time.sleep(max(0.0, 2.0 - (time.monotonic() - stopped)))
        store.start()
        outage = time.monotonic() - stopped
        assert held.get_result(block=True, timeout=60_000) == 0
        for n, message in enumerate(messages, start=1):
            assert message.get_result(block=True, timeout=60_000) == n * n
        assert [d.get_result(block=True, timeout=60_000) for d in duplicates] == [1, 4]
        broker.join(step.queue_name, timeout=30_000)
        runs = [int(counters.get(f"{prefix}:runs:{n}") or 0) for n in range(COUNT)]
        observed = {
            "test": "store stopped during a run",
            "outage_s": round(outage, 2),
            "body_runs": runs,
            "deferred_for_store": sum(
                1
                for e in decisions.seen
                if e.decision.value == "store_unavailable" and e.fields.get("stage") == "execute"
            ),
            **{d: decisions.count(d) for d in ("store_unavailable", "completed", "replayed")},
        }
        _observe(observed)
        assert runs == [1] * COUNT
        assert decisions.count("completed") == COUNT
        assert observed["deferred_for_store"] >= 1  # deliveries during the outage were kept
        assert decisions.count("replayed") == 2  # the two unreserved duplicates
        for message in [held, *messages]:
            record = middleware.guard.store.inspect(message.options[KEY_OPTION])
            assert record is not None and record.state is State.DONE
    finally:
        worker.stop()


def test_retries_on_a_redis_broker_skip_errors_a_retry_cannot_change(
    redis_broker_env, redis_url, decisions
) -> None:
    """Retries reads the actor's ``throws``: a terminal exception, the ``TaskFailedError`` of
    its key and an ``IdempotencyConflict`` fail the message at once; a plain error retries."""
    store_url = redis_url.rsplit("/", 1)[0] + "/1"
    broker, _, counters = redis_broker_env(
        store_url, terminal_exceptions=(LookupError,), dedupe_enqueue=False
    )
    prefix = f"r{uuid.uuid4().hex[:6]}"
    retry = {"store_results": True, "max_retries": 3, "min_backoff": 10, "max_backoff": 20}

    @dramatiq.actor(idempotent=True, **retry)
    def lookup(x: int) -> int:
        counters.incr(f"{prefix}:lookup")
        raise KeyError(x)

    @dramatiq.actor(idempotent=True, **retry)
    def keyed(x: int) -> int:
        counters.incr(f"{prefix}:keyed")
        return x

    @dramatiq.actor(idempotent=True, **retry)
    def flaky(x: int) -> int:
        if counters.incr(f"{prefix}:flaky") < 3:
            raise ConnectionError("blip")
        return x

    def failure(message: dramatiq.Message[Any], error: str) -> None:
        with pytest.raises(ResultFailure, match=error):  # stored once it failed for good
            message.get_result(block=True, timeout=20_000)

    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        failure(lookup.send(1), "KeyError")
        failure(lookup.send(1), "TaskFailedError")  # the key failed for good: replayed
        assert (
            keyed.send_with_options(args=(1,), idempotency_key="k").get_result(
                block=True, timeout=20_000
            )
            == 1
        )
        failure(keyed.send_with_options(args=(2,), idempotency_key="k"), "IdempotencyConflict")
        assert flaky.send(5).get_result(block=True, timeout=20_000) == 5
        broker.join(lookup.queue_name, timeout=20_000)
    finally:
        worker.stop()
    runs = [int(counters.get(f"{prefix}:{name}") or 0) for name in ("lookup", "keyed", "flaky")]
    assert runs == [1, 1, 3]  # the ordinary error was retried twice
    # each unretryable delivery was decided once: a retry would have decided it again
    assert (decisions.count("failed"), decisions.count("conflict")) == (1, 1)
    assert decisions.count("released") == 3  # the terminal error and the two blips
