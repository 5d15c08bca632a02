"""Celery end to end (the protocol is :mod:`benchmarks.e2e`'s), one variant per task base
class: plain ``Task``, ``IdempotentTask`` (unique keys, and every call sent twice),
celery-once ``QueueOnce`` and celery-singleton ``Singleton``.

The worker is ``celery worker --pool=prefork --concurrency=2`` in a subprocess, started once
and shared by every variant, so all of them meet the same warm worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from benchmarks import e2e
from benchmarks.celery_app import QUEUE, build_app, close_app, forget_results
from benchmarks.common import Servers, WorkerProcess
from benchmarks.variants import CELERY as VARIANTS
from benchmarks.variants import CELERY_PLAIN as PLAIN
from benchmarks.variants import Variant
from idemtask.testing.progress import Progress

POOL = "prefork"
CONCURRENCY = 2


def start_worker(servers: Servers) -> WorkerProcess:
    """``celery -A benchmarks.celery_app:app worker`` as a subprocess in its own session."""
    return WorkerProcess(
        "Celery",
        servers,
        [
            "celery",
            "-A",
            "benchmarks.celery_app:app",
            "worker",
            f"--pool={POOL}",
            f"--concurrency={CONCURRENCY}",
            "--queues",
            QUEUE,
            # WARNING for every variant: per-task INFO lines would cost more than a guard.
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
    )


def succeeded(value: bytes | None) -> bool:
    """A stored result meta, not the STARTED state the preset's tracking stores first."""
    return value is not None and b'"status": "SUCCESS"' in value


class CeleryBench:
    """The app, the worker and the clients that watch the servers (an ``e2e.Framework``)."""

    name = "celery"
    finished = staticmethod(succeeded)

    def __init__(self, servers: Servers) -> None:
        self.app, self.tasks = build_app(servers.broker_url, servers.backend_url, servers.store_url)
        self.backend = redis.Redis.from_url(servers.backend_url)
        self.store = redis.Redis.from_url(servers.store_url)
        self.worker = start_worker(servers)

    def close(self) -> None:
        self.worker.stop()
        close_app(self.app)
        self.backend.close()
        self.store.close()

    def publish(self, variant: Variant, run: str, n: int, body_ms: float) -> Any:
        return getattr(self.tasks, variant.target).apply_async((run, n, body_ms))

    def result_keys(self, handles: Sequence[Any]) -> list[str]:
        ids = dict.fromkeys(handle.id for handle in handles)
        return [f"celery-task-meta-{task_id}" for task_id in ids]

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get(timeout=timeout)

    def forget(self) -> None:
        forget_results(self.app)


def bench_celery(
    servers: Servers,
    calls: int,
    round_count: int,
    latency_calls: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    bench = CeleryBench(servers)
    try:
        e2e.wait_ready(bench, PLAIN)
        return e2e.bench(
            bench, servers, VARIANTS, calls, round_count, latency_calls, progress=progress
        )
    finally:
        bench.close()
