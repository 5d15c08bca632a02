"""Dramatiq end to end: N sends from first publish to last result, RedisBroker, a real
worker (``dramatiq --processes 2 --threads 2`` in a subprocess, shared by every variant)."""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from benchmarks.celery_e2e import call_sequence
from benchmarks.common import (
    Servers,
    WorkerProcess,
    command_calls,
    command_delta,
    rounds,
    wait_results,
)
from benchmarks.dramatiq_app import QUEUE, Actors, build_broker

PROCESSES = 2
THREADS = 2


@dataclass(frozen=True)
class Variant:
    name: str
    actor: str  # attribute of Actors
    duplicates: bool = False


VARIANTS = (
    Variant("plain actor", "plain"),
    Variant("IdempotencyMiddleware, unique keys", "idem"),
    Variant("IdempotencyMiddleware, 50% duplicates", "idem", duplicates=True),
)


def start_worker(servers: Servers) -> WorkerProcess:
    """``dramatiq benchmarks.dramatiq_app`` as a subprocess in its own session."""
    return WorkerProcess(
        "Dramatiq",
        servers,
        [
            "dramatiq",
            "benchmarks.dramatiq_app",
            "--processes",
            str(PROCESSES),
            "--threads",
            str(THREADS),
            "--queues",
            QUEUE,
        ],
    )


class DramatiqBench:
    def __init__(self, servers: Servers) -> None:
        self.actors: Actors = build_broker(
            servers.broker_url, servers.backend_url, servers.store_url
        )
        self.backend = redis.Redis.from_url(servers.backend_url)
        self.store = redis.Redis.from_url(servers.store_url)
        self.worker = start_worker(servers)

    def close(self) -> None:
        self.worker.stop()
        self.actors.broker.close()
        self.backend.close()
        self.store.close()

    def run(
        self, variant: Variant, calls: int, seed: int = 0, timeout: float = 600
    ) -> dict[str, Any]:
        """One timed run: send every call, wait for every result."""
        self.worker.check()
        actor = getattr(self.actors, variant.actor)
        run_id = uuid.uuid4().hex[:12]
        values = call_sequence(calls, variant.duplicates, seed)
        key_of = self.actors.backend.build_message_key
        before = command_calls(self.store)
        started = time.perf_counter()
        handles = [actor.send(run_id, n) for n in values]
        published = time.perf_counter()
        keys = list(dict.fromkeys(key_of(handle) for handle in handles))
        wait_results(self.backend, keys, timeout)
        elapsed = time.perf_counter() - started
        time.sleep(0.3)
        delta = command_delta(before, command_calls(self.store))
        sample = handles[-1].get_result(backend=self.actors.backend, block=True, timeout=10_000)
        if sample != values[-1]:
            raise AssertionError(f"{variant.name}: result {sample!r}, expected {values[-1]!r}")
        self.backend.flushdb()
        self.store.flushdb()
        return {
            "variant": variant.name,
            "calls": calls,
            "executed": len(keys),
            "seconds": elapsed,
            "publish_seconds": published - started,
            "calls_per_second": calls / elapsed,
            "store_commands_sent": delta.sent,
            "store_commands_in_scripts": delta.in_scripts,
            "store_commands_per_task": delta.sent_total / len(keys),
        }

    def warm_up(self, calls: int) -> None:
        deadline = time.monotonic() + 90
        while True:
            self.worker.check()
            try:
                message = self.actors.plain.send("warm", 0)
                message.get_result(backend=self.actors.backend, block=True, timeout=5_000)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        for variant in VARIANTS:
            self.run(variant, calls)


def bench_dramatiq(servers: Servers, calls: int, round_count: int) -> list[dict[str, Any]]:
    bench = DramatiqBench(servers)
    try:
        bench.warm_up(max(50, calls // 20))
        runs = []
        for index, variant in rounds(VARIANTS, round_count):
            record = bench.run(variant, calls, seed=index)
            record["round"] = index
            runs.append(record)
            print(
                f"  dramatiq round {index + 1}/{round_count} {variant.name:38s} "
                f"{record['calls_per_second']:8.0f} calls/s",
                file=sys.stderr,
                flush=True,
            )
        return runs
    finally:
        bench.close()
