"""The cost of one ``idemtask.step`` per task, against a plain guarded body, in one run.

Both variants go through the guard's whole execute path on the store's own redis-server
(acquire, run the body under its lease, complete), alternated task by task so they share
the machine's noise; the ratio is taken between figures of the same run. The store's
commands per task are counted apart, in a pass of their own (``INFO commandstats``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

import idemtask
from benchmarks.common import Servers, command_calls, command_delta, median, percentile
from idemtask.codecs import JsonCodec
from idemtask.guard import Call, Guard
from idemtask.policy import Policy
from idemtask.store import RedisStore

US = 1e6


def _plain(n: int) -> int:
    return n


def _one_step(n: int) -> int:
    return idemtask.step("charge", _plain, n)


def _task(guard: Guard, body: Callable[[int], int], run: str, n: int) -> None:
    """One delivery of a new key: acquire, the body under its lease, complete."""
    policy, codec = Policy(), JsonCodec()
    value = guard.run(policy, Call("bench.steps", f"{run}-{n}", ""), "t", lambda: body(n), codec)
    assert value == n


def bench_steps(servers: Servers, calls: int) -> dict[str, Any]:
    """µs per task and store commands per task: a plain guarded body, and one with a step."""
    store = RedisStore.from_url(servers.store_url)
    guard = Guard(store)
    counter = redis.Redis.from_url(servers.store_url)
    bodies = {"plain body": _plain, "one step": _one_step}
    samples: dict[str, list[float]] = {name: [] for name in bodies}
    run = uuid.uuid4().hex[:12]
    clock = time.perf_counter
    try:
        for n in range(-50, calls):  # the first 50 warm up the connection and the scripts
            for name, body in bodies.items():
                started = clock()
                _task(guard, body, f"{run}-{name}", n)
                if n >= 0:
                    samples[name].append((clock() - started) * US)
        commands: dict[str, Any] = {}
        for name, body in bodies.items():
            before = command_calls(counter)
            for n in range(calls):
                _task(guard, body, f"{run}-count-{name}", n)
            delta = command_delta(before, command_calls(counter))
            commands[name] = {"sent_per_task": delta.sent_total / calls, "sent": delta.sent}
    finally:
        counter.close()
        store.client.close()
    result: dict[str, Any] = {"calls": calls, "commands": commands}
    for name, values in samples.items():
        result[name] = {"p50_us": median(values), "p99_us": percentile(values, 99)}
    result["one_step_ratio"] = result["one step"]["p50_us"] / result["plain body"]["p50_us"]
    return result
