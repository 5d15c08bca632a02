"""Busy duplicates: how soon after the holder ends does each duplicate get its answer?

Each round publishes one call whose body holds its key ``hold`` seconds, waits until the body
has started, then delivers ``duplicates`` copies of the same call past the enqueue guard
(Celery: ``send_task`` by name; Dramatiq: ``broker.enqueue``), so every copy reaches the
worker while the key is running and is deferred. The figure is, per copy, the time from the
holder's end (marked by its body) to the copy's result appearing in the result backend,
watched every 2 ms: p50 and p99 over all rounds, with the deferrals each copy went through,
for every copy and for the deferred ones alone (a copy the worker only takes up after the
holder ended, queued behind it, replays without a deferral).

Workers are real subprocesses: ``celery worker --pool=prefork --concurrency=2`` and
``dramatiq --processes 1 --threads 2``, the latter at Dramatiq's default worker timeout
(1 s, which also paces its delay queue) and at 100 ms (``dramatiq_worker_timeout``).
Run as ``python -m benchmarks.busy_latency``; ``run(...)`` returns the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from benchmarks.busy_apps import (
    CELERY_TASK,
    QUEUE,
    build_celery,
    build_dramatiq,
    deferred_key,
    finished_key,
    started_key,
)
from benchmarks.common import Servers, WorkerProcess, machine, median, percentile, servers
from idemtask.testing.progress import Progress

POLL = 0.002  # seconds between looks at the result backend


@dataclass(frozen=True)
class Variant:
    name: str
    framework: str  # "celery" or "dramatiq"
    environment: tuple[tuple[str, str], ...] = ()  # extra variables for the worker


VARIANTS = (
    Variant("Celery prefork", "celery"),
    Variant("Dramatiq, worker timeout 1 s (default)", "dramatiq"),
    Variant("Dramatiq, worker timeout 100 ms", "dramatiq", (("dramatiq_worker_timeout", "100"),)),
)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """These variables set while a worker process is started (it copies the environment)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker_command(framework: str) -> list[str]:
    if framework == "celery":
        return [
            "celery", "-A", "benchmarks.busy_apps:celery_app", "worker", "--pool=prefork",
            "--concurrency=2", "--queues", QUEUE, "--loglevel=WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
    return [
        "dramatiq", "benchmarks.busy_apps:broker", "--processes", "1", "--threads", "2",
        "--queues", QUEUE,
    ]  # fmt: skip


@dataclass
class Publisher:
    """Sends the holder and its copies; names each message's result key."""

    holder: Callable[[str, float], Any]
    copy: Callable[[str, float], Any]
    result_key: Callable[[Any], str]
    message_id: Callable[[Any], str]
    close: Callable[[], None]


def _publisher(framework: str, servers: Servers, marks_url: str) -> Publisher:
    urls = (servers.broker_url, servers.backend_url, servers.store_url, marks_url)
    if framework == "celery":
        app = build_celery(*urls)
        task = app.tasks[CELERY_TASK]
        return Publisher(
            holder=lambda run, hold: task.apply_async((run, hold)),
            copy=lambda run, hold: app.send_task(CELERY_TASK, args=(run, hold)),
            result_key=lambda handle: f"celery-task-meta-{handle.id}",
            message_id=lambda handle: str(handle.id),
            close=app.close,
        )
    built = build_dramatiq(*urls)

    def copy(run: str, hold: float) -> Any:
        message = built.job.message(run, hold)
        built.broker.enqueue(message)  # not ``send``: past the enqueue guard, to the worker
        return message

    return Publisher(
        holder=lambda run, hold: built.job.send(run, hold),
        copy=copy,
        result_key=built.backend.build_message_key,
        message_id=lambda message: str(message.message_id),
        close=built.broker.close,
    )


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f}s")
        time.sleep(POLL)


def _arrivals(client: redis.Redis, keys: Sequence[str], timeout: float) -> list[float]:
    """The wall-clock time each result key first exists, looked at every ``POLL`` seconds."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(keys):
        pending = [key for key in keys if key not in seen]
        with client.pipeline(transaction=False) as pipe:
            for key in pending:
                pipe.exists(key)
            found = pipe.execute()
        now = time.time()
        for key, exists in zip(pending, found, strict=True):
            if exists:
                seen[key] = now
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(keys) - len(seen)} duplicate results missing")
        time.sleep(POLL)
    return [seen[key] for key in keys]


def measure(
    variant: Variant,
    servers: Servers,
    rounds: int,
    duplicates: int,
    hold: float,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every round of one variant, against one fresh worker process; ``progress`` counts
    the rounds."""
    progress = progress or Progress.off()
    marks_url = servers.db(2)
    marks = redis.Redis.from_url(marks_url)
    backend = redis.Redis.from_url(servers.backend_url)
    publisher = _publisher(variant.framework, servers, marks_url)
    extra = {"BENCH_MARKS": marks_url, "BENCH_FRAMEWORK": variant.framework}
    with _environment({**extra, **dict(variant.environment)}):
        worker = WorkerProcess(variant.name, servers, _worker_command(variant.framework))
    latencies: list[float] = []
    deferrals: list[int] = []  # per copy, in the order of ``latencies``
    try:
        warm = publisher.holder(f"warm-{uuid.uuid4().hex[:8]}", 0.0)
        _arrivals(backend, [publisher.result_key(warm)], 90)
        marks.delete("decisions:deferred")
        for _ in range(rounds):
            worker.check()
            run = uuid.uuid4().hex[:12]
            publisher.holder(run, hold)
            _wait(lambda: marks.exists(started_key(run)), 30, "holder start")  # noqa: B023
            copies = [publisher.copy(run, hold) for _ in range(duplicates)]
            arrived = _arrivals(backend, [publisher.result_key(c) for c in copies], 120)
            finished = float(marks.get(finished_key(run)) or "nan")
            latencies.extend(at - finished for at in arrived)
            for copy in copies:
                deferrals.append(int(marks.get(deferred_key(publisher.message_id(copy))) or 0))
            progress.update(advance=1)
    finally:
        worker.stop()
        publisher.close()
        for client in (marks, backend):
            client.flushdb()
            client.close()
        redis.Redis.from_url(servers.store_url).flushdb()
    deferred = [lat for lat, count in zip(latencies, deferrals, strict=True) if count]
    return {
        "variant": variant.name,
        "copies": len(latencies),
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "max_ms": _ms(max(latencies)),
        "deferred_copies": len(deferred),
        "deferred_p50_ms": _ms(percentile(deferred, 50)),
        "deferred_p99_ms": _ms(percentile(deferred, 99)),
        "deferrals_per_copy": round(sum(deferrals) / len(deferrals), 2),
        "most_deferrals": max(deferrals),
        "median_deferrals_of_deferred": median([c for c in deferrals if c]),
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def run(
    rounds: int = 20,
    duplicates: int = 5,
    hold: float = 0.1,
    variants: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure every variant (or those named) on fresh servers; one record per variant."""
    progress = progress or Progress.off()
    chosen = [v for v in VARIANTS if variants is None or v.name in variants]
    with servers() as started:
        results = []
        progress.begin("rounds", rounds * len(chosen))
        for variant in chosen:
            progress.update(variant=variant.name, line=True)
            record = measure(variant, started, rounds, duplicates, hold, progress)
            results.append(record)
            progress.write(f"  {json.dumps(record)}", file=sys.stderr)
    return {
        "benchmark": "busy_latency",
        "rounds": rounds,
        "duplicates": duplicates,
        "hold_seconds": hold,
        "machine": machine(),
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--duplicates", type=int, default=5)
    parser.add_argument("--hold", type=float, default=0.1)
    parser.add_argument("--variant", action="append", help="a variant's name; default all")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.rounds, args.duplicates, args.hold, args.variant), indent=2))


if __name__ == "__main__":
    main()
