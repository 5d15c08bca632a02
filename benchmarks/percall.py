"""Per-call costs, measured in this process against real redis-servers.

* key derivation: binding a call to the signature, canonical encoding and the two digests,
  for typical payloads (celery-once's and celery-singleton's own key functions alongside);
* enqueue latency of ``apply_async``: plain ``Task`` vs ``IdempotentTask``, and the
  duplicate short-circuit, one of each in turn so they share the machine's noise;
* execute overhead: the worker's own trace function (what a Celery worker calls per
  message) for a plain and an idempotent task, and the guard's two store calls apart.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
import timeit
import uuid
from collections.abc import Callable
from typing import Any

from celery.app.trace import build_tracer
from celery_once.helpers import queue_once_key
from celery_singleton import util as singleton_util

from benchmarks.celery_app import build_app, close_app
from benchmarks.common import Servers, median, percentile
from idemtask.celery import FINGERPRINT_HEADER, KEY_HEADER
from idemtask.celery.config import app_settings
from idemtask.codecs import JsonCodec
from idemtask.guard import Attempt, Call
from idemtask.keys import bind_arguments, derive_key
from idemtask.policy import Policy
from idemtask.runtime import guard_for

US = 1e6


# -------------------------------------------------------------------------------------------
# Key derivation


def one_scalar(order_id: int) -> None: ...


def five_arguments(
    order_id: int, customer: str, amount: float, express: bool = False, note: str | None = None
) -> None: ...


def nested(order: dict[str, Any]) -> None: ...


def _nested_order() -> dict[str, Any]:
    """A dict of 50 leaf values, two levels deep (an order with ten lines of four fields)."""
    lines = [
        {"sku": f"SKU-{i:05d}", "qty": i + 1, "price": 9.99 + i, "gift": i % 3 == 0}
        for i in range(10)
    ]
    return {
        "id": 981234,
        "customer": {"id": 5521, "email": "ann@example.com", "tier": "gold"},
        "currency": "EUR",
        "lines": lines,
        "shipping": {"method": "express", "country": "DE", "zip": "10115"},
    }


PAYLOADS: dict[str, tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = {
    "1 scalar": (one_scalar, (123456,), {}),
    "5 arguments": (five_arguments, (123456, "cus_8Hd2k", 49.9), {"express": True}),
    "nested dict, 50 values": (nested, (_nested_order(),), {}),
}


def _idemtask_key(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    arguments = bind_arguments(fn, args, kwargs, task_name="shop.task")
    return derive_key("shop.task", arguments, args=args, kwargs=kwargs).key


def _key_row(
    label: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    number: int,
    repeat: int,
) -> dict[str, Any]:
    signature = inspect.signature(fn)

    def idemtask_key() -> str:
        return _idemtask_key(fn, args, kwargs)

    def once_key() -> str:
        # QueueOnce.get_key: Signature.bind (no defaults applied) + queue_once_key.
        return str(queue_once_key("shop.task", signature.bind(*args, **kwargs).arguments, None))

    def singleton_key() -> str:
        return str(singleton_util.generate_lock("shop.task", list(args), kwargs))

    functions = {
        "idemtask": idemtask_key,
        "celery_once": once_key,
        "celery_singleton": singleton_key,
    }
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for function in functions.values():
        function()  # first-use caches (signatures, key prefixes) are not a steady cost
    # Batches alternate between the three, so a burst of load falls on all of them.
    for _ in range(repeat):
        for name, function in functions.items():
            batch = timeit.timeit(function, number=number)
            samples[name].append(batch / number * US)
    row: dict[str, Any] = {"payload": label}
    for name, values in samples.items():
        row[f"{name}_us"] = median(values)
        row[f"{name}_best_us"] = min(values)
    return row


def bench_keys(number: int = 2000, repeat: int = 15) -> list[dict[str, Any]]:
    """µs per key for each payload: idemtask (bind + encode + key and fingerprint digests),
    next to celery-once's and celery-singleton's key functions for the same call. Median
    of ``repeat`` batches of ``number`` calls (GC on, as in production), and the best batch,
    which is what the code costs on an idle core."""
    return [
        _key_row(label, fn, args, kwargs, number, repeat)
        for label, (fn, args, kwargs) in PAYLOADS.items()
    ]


# -------------------------------------------------------------------------------------------
# Enqueue latency


def bench_enqueue(servers: Servers, calls: int) -> dict[str, Any]:
    """Latency of ``apply_async`` (no worker: messages only pile up in the broker) for a plain
    Task, an IdempotentTask with a new key, and the same IdempotentTask call again (the
    duplicate short-circuit: one store call, nothing published). The three alternate call
    by call."""
    app, tasks = build_app(servers.broker_url, servers.backend_url, servers.store_url)
    run = uuid.uuid4().hex[:12]
    samples: dict[str, list[float]] = {"plain": [], "idempotent": [], "duplicate": []}
    handles: list[Any] = []
    clock = time.perf_counter
    try:
        for n in range(-50, calls):  # the first 50 warm up connections and caches
            started = clock()
            handles.append(tasks.plain.apply_async((run, n)))
            plain = clock() - started
            started = clock()
            handles.append(tasks.idem.apply_async((run, n)))
            new = clock() - started
            started = clock()
            handle = tasks.idem.apply_async((run, n))
            duplicate = clock() - started
            assert handle.id == handles[-1].id, "the duplicate was published"
            # Kept, like the others: a dropped AsyncResult unsubscribes from its result
            # channel in __del__, a round trip that would land in the next timed call.
            handles.append(handle)
            if n >= 0:
                samples["plain"].append(plain * US)
                samples["idempotent"].append(new * US)
                samples["duplicate"].append(duplicate * US)
    finally:
        del handles
        gc.collect()
        close_app(app)
    result: dict[str, Any] = {"calls": calls}
    for name, values in samples.items():
        result[name] = {
            "p50_us": percentile(values, 50),
            "p99_us": percentile(values, 99),
            "mean_us": statistics.fmean(values),
        }
    return result


# -------------------------------------------------------------------------------------------
# Execute overhead


def bench_execute(servers: Servers, calls: int) -> dict[str, Any]:
    """What a worker spends per message beyond the body: Celery's trace function for a plain
    Task and for an IdempotentTask whose key was reserved at enqueue (the normal path:
    acquire, run, complete, then Celery stores the result), alternated message by message.
    The guard's two store calls are also timed on their own (``begin``/``succeed``)."""
    app, tasks = build_app(servers.broker_url, servers.backend_url, servers.store_url)
    plain_trace = build_tracer(tasks.plain.name, tasks.plain, app=app, hostname="bench")
    idem_trace = build_tracer(tasks.idem.name, tasks.idem, app=app, hostname="bench")
    run = uuid.uuid4().hex[:12]
    plain_us: list[float] = []
    idem_us: list[float] = []
    clock = time.perf_counter
    try:
        for n in range(-50, calls):
            handle = tasks.idem.apply_async((run, n))  # reserves the key, as a caller would
            derived = tasks.idem.idemtask_key((run, n))
            headers = {KEY_HEADER: derived.key, FINGERPRINT_HEADER: derived.fingerprint}
            plain_id = uuid.uuid4().hex
            started = clock()
            plain_trace(plain_id, (run, n), {}, {"id": plain_id})
            plain = clock() - started
            started = clock()
            traced = idem_trace(handle.id, (run, n), {}, {"id": handle.id, "headers": headers})
            idem = clock() - started
            assert traced.retval == n, traced
            if n >= 0:
                plain_us.append(plain * US)
                idem_us.append(idem * US)
        guard_in, guard_out = _guard_steps(app, calls)
    finally:
        close_app(app)
    return {
        "calls": calls,
        "plain_trace": {"p50_us": median(plain_us), "p99_us": percentile(plain_us, 99)},
        "idempotent_trace": {"p50_us": median(idem_us), "p99_us": percentile(idem_us, 99)},
        "overhead_p50_us": median(idem_us) - median(plain_us),
        "guard_in_p50_us": median(guard_in),
        "guard_out_p50_us": median(guard_out),
    }


def _guard_steps(app: Any, calls: int) -> tuple[list[float], list[float]]:
    """``Guard.begin`` (acquire) and ``Guard.succeed`` (encode + complete) per task, on
    keys reserved first, as the worker meets them."""
    guard = guard_for(app_settings(app))
    policy = Policy()
    codec = JsonCodec()
    run = uuid.uuid4().hex
    guard_in: list[float] = []
    guard_out: list[float] = []
    clock = time.perf_counter
    for n in range(-50, calls):
        call = Call("bench.steps", f"{run}-{n}", "")
        task_id = uuid.uuid4().hex
        guard.reserve(policy, call, task_id)
        started = clock()
        attempt = guard.begin(policy, call, task_id)
        entered = clock()
        assert isinstance(attempt, Attempt)
        with guard.holding(attempt):
            pass
        left = clock()
        guard.succeed(attempt, n, codec)
        finished = clock()
        if n >= 0:
            guard_in.append((entered - started) * US)
            guard_out.append((finished - left) * US)
    return guard_in, guard_out
