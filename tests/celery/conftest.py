"""Fixtures for the Celery adapter tests: one real Redis as broker (db 0), result backend
(db 1), idemtask store (db 2) and run counter (db 3); in-process workers; worker processes."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery_support import Urls, WorkerProcess
from celery_testapp import build_app


@pytest.fixture
def urls(redis_url: str) -> Urls:
    return Urls(redis_url)


@pytest.fixture
def counter(urls: Urls) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(urls.counter)
    yield client
    client.close()


@pytest.fixture
def make_app(urls: Urls, request: pytest.FixtureRequest) -> Iterator[Callable[..., Celery]]:
    """``make_app(**conf)``: a fresh app with the test tasks and the at-least-once preset."""
    apps: list[Celery] = []

    def make(**overrides: Any) -> Celery:
        options: dict[str, Any] = {
            "broker_url": urls.broker,
            "backend_url": urls.backend,
            "store_url": urls.store,
            "counter_url": urls.counter,
        }
        options.update(overrides)
        app = build_app(request.node.name, **options)
        apps.append(app)
        return app

    yield make
    for app in apps:
        # Drop the backend's pending results while Redis is still up: their __del__
        # unsubscribes, which otherwise retries against a stopped server at exit.
        pending = getattr(app.backend, "_pending_results", None)
        if pending is not None:
            pending.concrete.clear()
        app.close()
    gc.collect()


@pytest.fixture
def worker_process(urls: Urls, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(store_url: str | None = None, visibility: float = 30) -> WorkerProcess:
        worker = WorkerProcess(
            urls, tmp_path, store_url=store_url or urls.store, visibility=visibility
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
