"""One renewal thread per process renews every lease the process holds in one round trip.

It sleeps until the earliest held lease reaches a third of its length, and with nothing
held for a third of the shortest lease it has seen: a lease taken and dropped within that
time (a short body) neither wakes it nor costs a renewal.

A lease that renewal finds taken over (or that ran out while the store was unreachable) is
marked lost, which the body sees as ``idemtask.current().lease_lost``.

The thread never dies of a failure: while renewals fail (the store unreachable or refusing,
or anything else going wrong) it retries after bounded, jittered delays that double from
``FIRST_RETRY`` up to ``MAX_RETRY`` (and a sixth of the shortest held lease), never later than
the earliest held lease's end; it logs once when failures start and once when they stop, and
marks a lease lost as soon as its last confirmed renewal is a lease length old.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from idemtask.errors import StoreUnavailable
from idemtask.events import Decision, emit
from idemtask.store.base import Lease, Store

logger = logging.getLogger("idemtask.lease")

FIRST_RETRY = 0.05  # seconds before the first retry of a failed renewal
MAX_RETRY = 2.0  # the longest wait between two retries


@dataclass(slots=True)
class _Held:
    lease: Lease
    on_lost: Callable[[], None]
    renewed_at: float  # monotonic time of the last confirmed acquire/renewal

    def ends_at(self) -> float:
        return self.renewed_at + self.lease.lease_ms / 1000.0


class LeaseKeeper:
    """Renews held leases every ``lease / 3`` (the shortest held lease sets the pace)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._reset()
        weak = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(weak))

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._held: dict[str, _Held] = {}
        self._thread: threading.Thread | None = None
        # When the keeper wakes up on its own (inf: not until notified; -inf: it is awake
        # and reads the held leases before it waits again, so a notify would be wasted).
        self._wake_at = -math.inf
        self._retry_at = -math.inf  # while renewals fail: no attempt before this time
        # How long the keeper waits when it holds nothing: a third of the shortest lease it
        # has seen, so a lease held meanwhile is never due before the keeper wakes on its
        # own and ``hold`` need not wake it (bodies shorter than that cost no thread switch).
        self._idle_wait: float | None = None
        self._failing_since: float | None = None
        self._failures = 0  # consecutive failed round trips
        self.renewals = 0  # round trips made, for metrics and tests
        self.failed_renewals = 0  # round trips that failed, in all

    def hold(self, lease: Lease, on_lost: Callable[[], None]) -> None:
        if self._pid != os.getpid():  # forked without the at-fork hook (e.g. os.fork in C)
            self._reset()
        with self._cond:
            now = time.monotonic()
            self._held[lease.attempt_id] = _Held(lease, on_lost, now)
            third = lease.lease_ms / 3000
            if self._idle_wait is None or third < self._idle_wait:
                self._idle_wait = third
            self._ensure_running()
            # A backoff set for longer leases must not outlast this one's retry cap.
            self._retry_at = min(self._retry_at, now + lease.lease_ms / 6000)
            # Wake the keeper only when this lease is due before it would wake anyway: a
            # lease as long as the ones held (or last seen, when it idles) never is, so a
            # busy worker does not switch threads on every task.
            if time.monotonic() + lease.lease_ms / 3000 < self._wake_at:
                self._cond.notify()

    def drop(self, attempt_id: str) -> None:
        with self._cond:
            self._held.pop(attempt_id, None)
            if self._held and self._pid == os.getpid():
                self._ensure_running()

    def held(self) -> list[Lease]:
        with self._cond:
            return [h.lease for h in self._held.values()]

    def _ensure_running(self) -> None:
        """Start the thread, or start it again if it was found dead (it should never die:
        ``_run`` survives every exception; this covers what it cannot catch)."""
        if self._thread is not None and self._thread.is_alive():
            return
        if self._thread is not None:
            logger.error("idemtask lease keeper thread had died; starting it again")
        self._thread = threading.Thread(target=self._run, name="idemtask-lease-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pause = FIRST_RETRY
        while True:
            try:
                self.renew_now(self._next_batch())
                pause = FIRST_RETRY
            except Exception:  # a bug here must not leave leases unrenewed
                logger.exception("idemtask lease keeper failed; carrying on")
                time.sleep(pause)
                pause = min(pause * 2, MAX_RETRY)

    def _next_batch(self) -> list[_Held]:
        with self._cond:
            batch = self._due(time.monotonic())
            while not batch:
                timeout = self._wait()
                now = time.monotonic()
                self._wake_at = math.inf if timeout is None else now + timeout
                self._cond.wait(timeout=timeout)
                self._wake_at = -math.inf
                batch = self._due(time.monotonic())
            return batch

    def _due(self, now: float) -> list[_Held]:
        """Nothing until one lease reaches a third of its length; then every lease past a
        sixth of its own, so one round trip serves them all. A body shorter than a third of
        its lease never costs a renewal. After a failed renewal, nothing before the retry."""
        if now < self._retry_at:
            return []
        if not any(now - h.renewed_at >= h.lease.lease_ms / 3000 for h in self._held.values()):
            return []
        return [h for h in self._held.values() if now - h.renewed_at >= h.lease.lease_ms / 6000]

    def _wait(self) -> float | None:
        if not self._held:
            return self._idle_wait
        now = time.monotonic()
        due_at = min(h.renewed_at + h.lease.lease_ms / 3000 for h in self._held.values())
        return max(max(due_at, self._retry_at) - now, 0.001)

    def renew_now(self, batch: list[_Held] | None = None) -> None:
        """Renew ``batch`` (default: everything held) in one round trip."""
        if batch is None:
            with self._cond:
                batch = list(self._held.values())
        if not batch:
            return
        started = time.monotonic()
        try:
            answers = self._store.renew_many([h.lease for h in batch])
        except Exception as exc:  # the store failed, or a bug: the leases are unconfirmed
            self._failed(batch, exc)
            return
        self._recovered()
        self.renewals += 1
        emit(
            Decision.RENEWED,
            None,
            duration=time.monotonic() - started,
            leases=len(batch),
            lost=answers.count(False),
        )
        for held, ok in zip(batch, answers, strict=True):
            if ok:
                held.renewed_at = started
            else:
                self._lose(held)

    def _failed(self, batch: list[_Held], exc: Exception) -> None:
        """Lose every lease that has now run out; retry the rest after a backoff."""
        now = time.monotonic()
        with self._cond:
            self.failed_renewals += 1
            self._failures += 1
            first = self._failing_since is None
            if first:
                self._failing_since = now
        if first:
            logger.warning(
                "idemtask lease renewal failing (%s); retrying with backoff, leases are "
                "marked lost when they run out",
                exc,
                exc_info=not isinstance(exc, StoreUnavailable),
            )
        for held in batch:
            if now >= held.ends_at():
                self._lose(held)
        with self._cond:
            self._retry_at = now + self._retry_delay(now)

    def _retry_delay(self, now: float) -> float:
        """Doubling from FIRST_RETRY with each failure, jittered, capped at MAX_RETRY and a
        sixth of the shortest lease, and never past the end of the earliest lease."""
        held = list(self._held.values())
        cap = min([MAX_RETRY, *(h.lease.lease_ms / 6000 for h in held)])
        doubled: float = FIRST_RETRY * 2.0 ** min(self._failures - 1, 16)
        delay = min(doubled, cap) * random.uniform(0.5, 1.0)
        if held:
            delay = min(delay, min(h.ends_at() for h in held) - now)
        return max(delay, 0.001)

    def _recovered(self) -> None:
        with self._cond:
            since, self._failing_since = self._failing_since, None
            failures, self._failures = self._failures, 0
            self._retry_at = -math.inf
        if since is not None:
            logger.warning(
                "idemtask lease renewal recovered after %d failed attempt(s) over %.1fs",
                failures,
                time.monotonic() - since,
            )

    def _lose(self, held: _Held) -> None:
        with self._cond:
            if self._held.get(held.lease.attempt_id) is not held:
                return  # dropped meanwhile: its attempt has finished
            del self._held[held.lease.attempt_id]
        try:
            held.on_lost()
        except Exception:
            logger.exception("idemtask lease-lost callback failed")


def _reset_in_child(weak: weakref.ref[LeaseKeeper]) -> None:
    keeper = weak()
    if keeper is not None:
        keeper._reset()
