"""Helpers for the Celery adapter tests: database URLs, in-process workers, worker
processes, polling."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu.asynchronous import get_event_loop, set_event_loop
from kombu.transport import redis as kombu_redis

from servers import terminate_session

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@dataclass(frozen=True)
class Urls:
    base: str

    def db(self, number: int) -> str:
        return f"{self.base.rsplit('/', 1)[0]}/{number}"

    @property
    def broker(self) -> str:
        return self.db(0)

    @property
    def backend(self) -> str:
        return self.db(1)

    @property
    def store(self) -> str:
        return self.db(2)

    @property
    def counter(self) -> str:
        return self.db(3)


@contextmanager
def running_worker(app: Celery, pool: str = "threads", concurrency: int = 2) -> Iterator[Any]:
    """A worker inside this process (celery.contrib.testing), stopped on exit."""
    hub = None
    try:
        with start_worker(
            app,
            pool=pool,
            concurrency=concurrency,
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=30,
        ) as worker:
            hub = getattr(worker, "hub", None)
            yield worker
    finally:
        # kombu < 5.6 leaves the closed hub of a stopped worker as the process's current
        # event loop; the next worker started in this process would adopt it, and its
        # stopped timer never fires an ETA or countdown message (retries, deferrals).
        # kombu 5.6 clears it on close, as done here for older versions.
        if hub is not None and get_event_loop() is hub:
            set_event_loop(None)


#: kombu 5.7 made the Redis transport's scan for unacked messages past their visibility
#: timeout configurable; before, it runs from a fixed 10 s timer and scans only on every
#: 10th call, so a message is redelivered up to about 100 s after its timeout expired.
KOMBU_RESTORE_OPTIONS = hasattr(kombu_redis.Channel, "unacked_restore_interval")


@contextmanager
def scanning_unacked(app: Celery, interval: float = 1.0) -> Iterator[None]:
    """Run the transport's own scan (``QoS.restore_visible``) every ``interval`` seconds, as
    ``unacked_restore_interval=1, unacked_restore_throttle=1`` makes kombu >= 5.7 do; a
    no-op there. The scan works on the broker's shared keys, so any channel may run it."""
    if KOMBU_RESTORE_OPTIONS:
        yield
        return
    stop = threading.Event()

    def scan() -> None:
        with app.connection_for_write() as connection:
            qos = connection.default_channel.qos
            while not stop.wait(interval):
                qos.restore_visible(num=10, interval=1)

    thread = threading.Thread(target=scan, name="unacked-scan", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.05)


class WorkerProcess:
    """``celery -A celery_testapp worker --pool=prefork`` as a subprocess, configured by
    ``ITEST_*`` variables; its log is kept for failure messages."""

    def __init__(self, urls: Urls, tmp: Path, *, store_url: str, visibility: float = 30) -> None:
        self.log = tmp / "worker.log"
        env = dict(os.environ)
        env.update(
            ITEST_BROKER=urls.broker,
            ITEST_BACKEND=urls.backend,
            ITEST_STORE=store_url,
            ITEST_COUNTER=urls.counter,
            ITEST_VISIBILITY=str(visibility),
            PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")]),
        )
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_testapp",
            "worker",
            "--pool=prefork",
            "-c",
            "2",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--logfile={self.log}",
        ]
        self.proc = subprocess.Popen(command, env=env, cwd=HERE, start_new_session=True)
        wait_for(lambda: self.log.exists() and "ready." in self.log.read_text(), 30, "worker")

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        """Kill the worker and its pool children at once: the test is over, and a warm
        shutdown only waits (a second or more) for the pool to wind down."""
        terminate_session(self.proc, grace=0)
