"""One renewal thread per process renews every lease the process holds in one round trip.

A lease that renewal finds taken over (or that ran out while the store was unreachable) is
marked lost, which the body sees as ``idemtask.current().lease_lost``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from idemtask.errors import StoreUnavailable
from idemtask.events import Decision, emit
from idemtask.store.base import Lease, Store

logger = logging.getLogger("idemtask.lease")


@dataclass(slots=True)
class _Held:
    lease: Lease
    on_lost: Callable[[], None]
    renewed_at: float  # monotonic time of the last confirmed acquire/renewal


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
        self.renewals = 0  # round trips made, for metrics and tests

    def hold(self, lease: Lease, on_lost: Callable[[], None]) -> None:
        if self._pid != os.getpid():  # forked without the at-fork hook (e.g. os.fork in C)
            self._reset()
        with self._cond:
            self._held[lease.attempt_id] = _Held(lease, on_lost, time.monotonic())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="idemtask-lease-keeper", daemon=True
                )
                self._thread.start()
            # Wake the keeper only when this lease is due before it would wake anyway: a
            # lease as long as the ones held never is, so a busy worker does not switch
            # threads on every task.
            if time.monotonic() + lease.lease_ms / 3000 < self._wake_at:
                self._cond.notify()

    def drop(self, attempt_id: str) -> None:
        with self._cond:
            self._held.pop(attempt_id, None)

    def held(self) -> list[Lease]:
        with self._cond:
            return [h.lease for h in self._held.values()]

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._due(time.monotonic())
                while not batch:
                    timeout = self._wait()
                    now = time.monotonic()
                    self._wake_at = math.inf if timeout is None else now + timeout
                    self._cond.wait(timeout=timeout)
                    self._wake_at = -math.inf
                    batch = self._due(time.monotonic())
            self.renew_now(batch)

    def _due(self, now: float) -> list[_Held]:
        """Nothing until one lease reaches a third of its length; then every lease past a
        sixth of its own, so one round trip serves them all. A body shorter than a third of
        its lease never costs a renewal."""
        if not any(now - h.renewed_at >= h.lease.lease_ms / 3000 for h in self._held.values()):
            return []
        return [h for h in self._held.values() if now - h.renewed_at >= h.lease.lease_ms / 6000]

    def _wait(self) -> float | None:
        if not self._held:
            return None
        now = time.monotonic()
        due_at = min(h.renewed_at + h.lease.lease_ms / 3000 for h in self._held.values())
        return max(due_at - now, 0.001)

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
        except StoreUnavailable as exc:
            logger.warning("idemtask lease renewal failed: %s", exc)
            for held in batch:
                if started - held.renewed_at >= held.lease.lease_ms / 1000.0:
                    self._lose(held)
            return
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

    def _lose(self, held: _Held) -> None:
        self.drop(held.lease.attempt_id)
        try:
            held.on_lost()
        except Exception:
            logger.exception("idemtask lease-lost callback failed")


def _reset_in_child(weak: weakref.ref[LeaseKeeper]) -> None:
    keeper = weak()
    if keeper is not None:
        keeper._reset()
