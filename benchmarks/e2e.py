"""End to end, the same protocol for both frameworks: real broker, result backend, store and
worker processes, each run measured as whole-system CPU and as worker throughput.

A throughput run fills the queue first: the worker's whole session is stopped (SIGSTOP),
the publisher sends every call, then the worker is let go (SIGCONT) and timed from there
until the last result is stored. So the worker's throughput is measured apart from the
publisher, whose own CPU and wall time are measured during the publishing alone. CPU is
read for the publisher (this process, during publishing only), the worker's process tree,
the broker's and the store's ``redis-server`` (see :mod:`benchmarks.cpu`), from before the
first publish until the worker has finished.

A latency run sends one call at a time to the running worker and waits for its result the
way a caller does (Celery's ``AsyncResult.get``, Dramatiq's ``get_result(block=True)``):
the time from before the publish to the result in hand.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis

from benchmarks.body import BODIES_MS
from benchmarks.common import (
    Servers,
    WorkerProcess,
    command_calls,
    command_delta,
    percentile,
    rotated,
    wait_results,
)
from benchmarks.cpu import CpuMeter
from benchmarks.variants import Variant
from idemtask.testing.progress import Progress

US = 1e6
#: After the last result is stored: the ack, celery-once's and celery-singleton's unlock.
SETTLE_SECONDS = 0.3
#: Polling interval while waiting for the last result (a single-key read).
POLL_SECONDS = 0.005


class Framework(Protocol):
    """What :func:`bench` needs from a framework's bench."""

    name: str
    worker: WorkerProcess
    backend: redis.Redis
    store: redis.Redis

    @property
    def finished(self) -> Callable[[bytes | None], bool] | None:
        """None: a result exists once its key does; else what a stored result satisfies."""

    def publish(self, variant: Variant, run: str, n: int, body_ms: float) -> Any: ...

    def result_keys(self, handles: Sequence[Any]) -> list[str]: ...

    def result(self, handle: Any, timeout: float) -> Any: ...

    def forget(self) -> None: ...


def call_values(calls: int, duplicates: bool, seed: int) -> list[int]:
    """The second argument of each call: ``calls`` distinct values, then (with duplicates)
    the same values again in a shuffled order."""
    values = list(range(calls))
    if duplicates:
        again = list(values)
        random.Random(seed).shuffle(again)
        values += again
    return values


def _reset(framework: Framework) -> None:
    framework.forget()
    framework.backend.flushdb()
    framework.store.flushdb()


def throughput_run(
    framework: Framework,
    meter: CpuMeter,
    variant: Variant,
    calls: int,
    body_ms: float,
    seed: int = 0,
    timeout: float = 600,
) -> dict[str, Any]:
    """One run on a pre-filled queue (see the module's docstring)."""
    framework.worker.check()
    run = uuid.uuid4().hex[:12]
    values = call_values(calls, variant.duplicates, seed)
    originals, repeats = values[:calls], values[calls:]
    framework.worker.pause()
    try:
        commands_before = command_calls(framework.store)
        cpu_before = meter.read()
        publisher_before = time.process_time()
        started = time.perf_counter()
        handles = [framework.publish(variant, run, n, body_ms) for n in originals]
        published = time.perf_counter()
        publisher_cpu = time.process_time() - publisher_before
        # The duplicates are timed and metered on their own: the worker is stopped, so what
        # they cost is the publisher's and the servers' CPU in this phase alone.
        cpu_between = meter.read()
        repeat_before = time.process_time()
        repeat_started = time.perf_counter()
        handles += [framework.publish(variant, run, n, body_ms) for n in repeats]
        repeat_seconds = time.perf_counter() - repeat_started
        repeat_cpu = time.process_time() - repeat_before
        cpu_repeats = CpuMeter.delta(cpu_between, meter.read()) if repeats else {}
        keys = framework.result_keys(handles)
        resumed = time.perf_counter()
    finally:
        framework.worker.resume()
    wait_results(framework.backend, keys, timeout, POLL_SECONDS, framework.finished)
    done = time.perf_counter()
    time.sleep(SETTLE_SECONDS)
    cpu = CpuMeter.delta(cpu_before, meter.read())
    delta = command_delta(commands_before, command_calls(framework.store))
    sample = framework.result(handles[-1], timeout=10)
    if sample != values[-1]:
        raise AssertionError(f"{variant.name}: result {sample!r}, expected {values[-1]!r}")
    del handles
    _reset(framework)
    consume = done - resumed
    return {
        "variant": variant.name,
        "role": variant.role,
        "body_ms": body_ms,
        "calls": len(values),
        "executed": len(keys),
        "publish_seconds": published - started + repeat_seconds,
        "publisher_cpu_seconds": publisher_cpu + repeat_cpu,
        "duplicates": len(repeats),
        "duplicates_publish_seconds": repeat_seconds,
        "duplicates_publisher_cpu_seconds": repeat_cpu,
        "duplicates_cpu_seconds": cpu_repeats,
        "consume_seconds": consume,
        "tasks_per_second": len(keys) / consume,
        "cpu_seconds": cpu,
        "system_cpu_seconds": publisher_cpu + repeat_cpu + sum(cpu.values()),
        "store_commands_sent": delta.sent,
        "store_commands_in_scripts": delta.in_scripts,
        "store_commands_per_task": delta.sent_total / len(keys),
    }


def latency_run(framework: Framework, variant: Variant, calls: int) -> dict[str, Any]:
    """``calls`` calls with an empty body, one at a time, each waited for by the caller."""
    framework.worker.check()
    run = uuid.uuid4().hex[:12]
    clock = time.perf_counter
    samples = []
    handles = []
    for n in range(calls):
        started = clock()
        handle = framework.publish(variant, run, n, 0.0)
        if framework.result(handle, timeout=30) != n:
            raise AssertionError(f"{variant.name}: wrong result for call {n}")
        samples.append((clock() - started) * US)
        handles.append(handle)  # dropped later: an AsyncResult's __del__ is a round trip
    del handles
    _reset(framework)
    return {
        "variant": variant.name,
        "calls": calls,
        "p50_us": percentile(samples, 50),
        "p99_us": percentile(samples, 99),
        "samples_us": [round(s) for s in samples],
    }


def bench(
    framework: Framework,
    servers: Servers,
    variants: Sequence[Variant],
    calls: int,
    round_count: int,
    latency_calls: int,
    bodies: Sequence[float] = BODIES_MS,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every body duration, every variant, ``round_count`` alternated rounds; then, in each
    round, a latency run of each variant without duplicates. ``progress`` counts the runs."""
    progress = progress or Progress.off()
    meter = CpuMeter(
        {
            "worker": framework.worker.proc.pid,
            "broker": _pid(servers.broker.pid),
            "store": _pid(servers.store.pid),
        }
    )
    singles = [variant for variant in variants if not variant.duplicates]
    runs = len(variants) + round_count * (len(bodies) * len(variants) + len(singles))
    progress.begin("runs", runs, round="warm-up")
    for variant in variants:  # warm up: connections, script loads, imports in the pool
        throughput_run(framework, meter, variant, max(20, calls // 20), 0.0)
        progress.update(advance=1)
    throughput: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
    for index in range(round_count):
        progress.update(round=f"{index + 1}/{round_count}", line=True)
        for body_ms in bodies:
            for variant in rotated(variants, index):
                record = throughput_run(framework, meter, variant, calls, body_ms, seed=index)
                record["round"] = index
                throughput.append(record)
                progress.write(
                    f"  {framework.name} round {index + 1}/{round_count} {body_ms:4.0f} ms "
                    f"{variant.name:38s} {record['tasks_per_second']:7.0f} tasks/s "
                    f"{record['system_cpu_seconds'] / record['calls'] * US:6.0f} µs CPU/call",
                    file=sys.stderr,
                )
                progress.update(advance=1)
        for variant in rotated(singles, index):
            record = latency_run(framework, variant, latency_calls)
            record["round"] = index
            latency.append(record)
            progress.update(advance=1)
    return {"calls": calls, "bodies_ms": list(bodies), "throughput": throughput, "latency": latency}


def _pid(pid: int | None) -> int:
    if pid is None:
        raise RuntimeError("a benchmark server is not running")
    return pid


def wait_ready(framework: Framework, variant: Variant, timeout: float = 90) -> None:
    """Block until the worker answers a call (it has started and connected)."""
    deadline = time.monotonic() + timeout
    while True:
        framework.worker.check()
        try:
            framework.result(framework.publish(variant, "warm", 0, 0.0), timeout=5)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
