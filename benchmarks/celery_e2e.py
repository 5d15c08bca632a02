"""Celery end to end: N calls from first publish to last result, through a real broker,
result backend and worker, one variant per task base class.

The worker is ``celery worker --pool=prefork --concurrency=2`` in a subprocess, started once
and shared by every variant, so all of them meet the same warm worker. The publisher is this
process. Both run on the same machine, so a figure is the throughput of the whole system:
publisher, worker, broker and store together.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from benchmarks.celery_app import QUEUE, build_app, close_app, forget_results
from benchmarks.common import (
    Servers,
    WorkerProcess,
    command_calls,
    command_delta,
    rounds,
    wait_results,
)

POOL = "prefork"
CONCURRENCY = 2


@dataclass(frozen=True)
class Variant:
    name: str
    task: str  # attribute of Tasks
    duplicates: bool = False  # half the calls repeat an earlier call's arguments


VARIANTS = (
    Variant("plain Task", "plain"),
    Variant("IdempotentTask, unique keys", "idem"),
    Variant("IdempotentTask, 50% duplicates", "idem", duplicates=True),
    Variant("celery-once QueueOnce", "once"),
    Variant("celery-singleton Singleton", "singleton"),
)


def call_sequence(calls: int, duplicates: bool, seed: int) -> list[int]:
    """The second argument of each call. With duplicates every value appears twice, in a
    shuffled order, so a repeat may meet its original queued, running or done."""
    if not duplicates:
        return list(range(calls))
    values = list(range(calls // 2)) * 2
    random.Random(seed).shuffle(values)
    return values


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


class CeleryBench:
    """Holds the app, the worker and the clients that watch the servers."""

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.app, self.tasks = build_app(servers.broker_url, servers.backend_url, servers.store_url)
        self.backend = redis.Redis.from_url(servers.backend_url)
        self.store = redis.Redis.from_url(servers.store_url)
        self.worker = start_worker(servers)

    def close(self) -> None:
        self.worker.stop()
        close_app(self.app)
        self.backend.close()
        self.store.close()

    def task(self, variant: Variant) -> Any:
        return getattr(self.tasks, variant.task)

    def run(
        self, variant: Variant, calls: int, seed: int = 0, timeout: float = 600
    ) -> dict[str, Any]:
        """One timed run: publish every call, wait for every result."""
        self.worker.check()
        task = self.task(variant)
        run_id = uuid.uuid4().hex[:12]
        values = call_sequence(calls, variant.duplicates, seed)
        before = command_calls(self.store)
        started = time.perf_counter()
        handles = [task.apply_async((run_id, n)) for n in values]
        published = time.perf_counter()
        ids = list(dict.fromkeys(handle.id for handle in handles))
        wait_results(self.backend, [f"celery-task-meta-{i}" for i in ids], timeout)
        elapsed = time.perf_counter() - started
        # The others release their locks after the result is stored: let the worker finish.
        time.sleep(0.3)
        delta = command_delta(before, command_calls(self.store))
        sample = handles[-1].get(timeout=10)
        if sample != values[-1]:
            raise AssertionError(f"{variant.name}: result {sample!r}, expected {values[-1]!r}")
        del handles
        forget_results(self.app)
        self.backend.flushdb()
        self.store.flushdb()
        return {
            "variant": variant.name,
            "calls": calls,
            "executed": len(ids),
            "seconds": elapsed,
            "publish_seconds": published - started,
            "calls_per_second": calls / elapsed,
            "store_commands_sent": delta.sent,
            "store_commands_in_scripts": delta.in_scripts,
            "store_commands_per_task": delta.sent_total / len(ids),
        }

    def warm_up(self, calls: int) -> None:
        """Start-up and first-use costs (connections, script loads, imports in the pool
        processes) before anything is timed; also proves the worker is up."""
        deadline = time.monotonic() + 90
        while True:
            self.worker.check()
            try:
                self.tasks.plain.apply_async(("warm", 0)).get(timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        for variant in VARIANTS:
            self.run(variant, calls)


def bench_celery(servers: Servers, calls: int, round_count: int) -> list[dict[str, Any]]:
    """Every variant ``round_count`` times, alternated; one record per run."""
    bench = CeleryBench(servers)
    try:
        bench.warm_up(max(50, calls // 20))
        runs = []
        for index, variant in rounds(VARIANTS, round_count):
            record = bench.run(variant, calls, seed=index)
            record["round"] = index
            runs.append(record)
            print(
                f"  celery round {index + 1}/{round_count} {variant.name:32s} "
                f"{record['calls_per_second']:8.0f} calls/s",
                file=sys.stderr,
                flush=True,
            )
        return runs
    finally:
        bench.close()
