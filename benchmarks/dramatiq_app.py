"""The Dramatiq broker and actors of the end-to-end benchmark.

A Redis broker with idemtask's ``at_least_once`` preset (its middleware stack and broker
settings), the Results middleware (the benchmark waits for results) and
``IdempotencyMiddleware`` with the preset's settings before Retries, as idemtask's docs
register it. The plain actor
runs through the same broker, middleware included (``idempotent`` is off for it), so the
two variants differ only in that option. The worker imports this module as
``dramatiq benchmarks.dramatiq_app`` with the URLs in ``BENCH_*`` variables.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from benchmarks.body import body
from idemtask.dramatiq import IdempotencyMiddleware, presets

QUEUE = "bench"


@dataclass(frozen=True)
class Actors:
    broker: RedisBroker
    backend: RedisBackend
    plain: Any
    idem: Any


def build_broker(broker_url: str, backend_url: str, store_url: str) -> Actors:
    """The broker, its result backend and both actors (same body), set as the global broker."""
    preset = presets.at_least_once()
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        url=broker_url, middleware=preset.middleware(), **preset.redis_broker
    )
    backend = RedisBackend(url=backend_url)
    broker.add_middleware(Results(backend=backend))  # type: ignore[no-untyped-call]
    broker.add_middleware(
        IdempotencyMiddleware(
            redis_url=store_url, lease=preset.lease, result_ttl=preset.result_ttl
        ),
        before=Retries,
    )
    dramatiq.set_broker(broker)

    @dramatiq.actor(actor_name="bench_plain", queue_name=QUEUE, store_results=True)
    def plain(run: str, n: int, body_ms: float = 0) -> int:
        return body(n, body_ms)

    @dramatiq.actor(actor_name="bench_idem", queue_name=QUEUE, store_results=True, idempotent=True)
    def idem(run: str, n: int, body_ms: float = 0) -> int:
        return body(n, body_ms)

    return Actors(broker, backend, plain, idem)


if "BENCH_BROKER" in os.environ:
    # WARNING for both variants, as for the Celery worker: idemtask logs each decision at
    # INFO, which a production worker would normally keep.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("idemtask").setLevel(logging.WARNING)
    actors = build_broker(
        os.environ["BENCH_BROKER"], os.environ["BENCH_BACKEND"], os.environ["BENCH_STORE"]
    )
    broker = actors.broker
