"""Dramatiq end to end (the protocol is :mod:`benchmarks.e2e`'s): a plain actor and an
idempotent one (unique keys, and every call sent twice) through one broker with idemtask's
middleware. The worker is ``dramatiq --processes 2 --threads 2`` in a subprocess, shared
by every variant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from benchmarks import e2e
from benchmarks.common import Servers, WorkerProcess
from benchmarks.dramatiq_app import QUEUE, Actors, build_broker
from benchmarks.variants import DRAMATIQ as VARIANTS
from benchmarks.variants import DRAMATIQ_PLAIN as PLAIN
from benchmarks.variants import Variant
from idemtask.testing.progress import Progress

PROCESSES = 2
THREADS = 2


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
    """The broker, the worker and the clients that watch the servers (an ``e2e.Framework``)."""

    name = "dramatiq"
    finished = None  # a result exists once its key does

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

    def publish(self, variant: Variant, run: str, n: int, body_ms: float) -> Any:
        return getattr(self.actors, variant.target).send(run, n, body_ms)

    def result_keys(self, handles: Sequence[Any]) -> list[str]:
        key_of = self.actors.backend.build_message_key
        return list(dict.fromkeys(key_of(handle) for handle in handles))

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get_result(
            backend=self.actors.backend, block=True, timeout=int(timeout * 1000)
        )

    def forget(self) -> None:
        pass


def bench_dramatiq(
    servers: Servers,
    calls: int,
    round_count: int,
    latency_calls: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    bench = DramatiqBench(servers)
    try:
        e2e.wait_ready(bench, PLAIN)
        return e2e.bench(
            bench, servers, VARIANTS, calls, round_count, latency_calls, progress=progress
        )
    finally:
        bench.close()
