"""Duplicates delivered while their key's first call runs, under a real prefork worker: each
copy is deferred on ``busy_delay``'s schedule (short at first, growing, capped), so it
replays the holder's value soon after the holder ends instead of a lease period later."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from celery import Celery
from celery_support import wait_for
from celery_testapp import decisions, deferrals

from idemtask.guard import MAX_BUSY_DELAY, busy_delay

pytestmark = [pytest.mark.celery, pytest.mark.slow]

HOLD = 1.0  # seconds the first call's body runs
LEASE = 2.0  # the test app's lease: renewed while the body runs, so never the cap here


def most_deferrals(holding: float) -> int:
    """The most deferrals a copy delivered while the holder has ``holding`` seconds left can
    go through: each waits at least its delay, and one that comes back after the holder
    ended replays instead of deferring."""
    count, waited = 1, 0.0
    while waited + busy_delay(count - 1, LEASE) < holding:
        waited += busy_delay(count - 1, LEASE)
        count += 1
    return count


def test_duplicates_delivered_while_the_first_runs_defer_on_the_schedule(
    make_app: Callable[..., Celery],
    worker_process: Callable[..., object],
    counter: redis.Redis,
) -> None:
    app = make_app()
    record = app.tasks["t.record"]
    key = record.idemtask_key(("busy", HOLD)).key
    worker_process()
    first = record.delay("busy", HOLD)
    wait_for(lambda: counter.get("runs:busy"), 30, "the first call's body")
    # By name: no reservation at enqueue, so each copy reaches the worker and finds the key
    # running.
    copies = [app.send_task("t.record", args=("busy", HOLD)) for _ in range(3)]
    expected = first.get(timeout=30)
    assert [copy.get(timeout=30) for copy in copies] == [expected] * 3
    assert int(counter.get("runs:busy") or 0) == 1
    seen = decisions(counter, key)
    assert seen.get("replayed") == 3
    bound = most_deferrals(HOLD)
    assert bound == 6  # 0.05 + 0.1 + 0.2 + 0.25 + 0.25 < 1.0 s
    for copy in copies:
        steps = deferrals(counter, copy.id)
        assert 1 <= len(steps) <= bound, steps
        # The n-th deferral carries n and waits the n-th delay of the schedule: they grow.
        assert [count for count, _ in steps] == list(range(1, len(steps) + 1))
        delays = [delay for _, delay in steps]
        assert delays == [busy_delay(n, LEASE) for n in range(len(steps))]
        assert delays == sorted(delays) and max(delays) <= MAX_BUSY_DELAY
    assert seen.get("deferred") == sum(len(deferrals(counter, c.id)) for c in copies)
