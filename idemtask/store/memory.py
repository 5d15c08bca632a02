"""MemoryStore: the same contract in one process (the demo, eager mode, unit tests).

It mirrors the Lua scripts step for step under one lock, record lifetimes included (see
``docs/architecture.md``). Expired records are dropped as the clock passes their deadline
(a heap of deadlines, swept on every operation), not only when their key is touched again.
It guards nothing across processes: use RedisStore for real workers.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from idemtask.store.base import (
    AcquireAnswer,
    Acquired,
    Busy,
    CancelAnswer,
    CompleteAnswer,
    Completed,
    Conflict,
    Done,
    Duplicate,
    Failed,
    Held,
    Lease,
    New,
    Poisoned,
    Record,
    Recorded,
    ReleaseAnswer,
    Released,
    ReserveAnswer,
    Stale,
    State,
    StepAnswer,
    StepsAnswer,
    StoredResult,
)


@dataclass(slots=True)
class _Row:
    state: State
    task_id: str
    task_name: str
    holder: str
    token: int
    lease_until_ms: int
    fingerprint: str
    deliveries: int
    result: StoredResult | None
    error: str
    created_ms: int
    updated_ms: int
    expires_ms: int
    grace_ms: int = 0  # the result TTL the record outlives a lease by ('g' in Redis)
    swept_at_ms: int = 0  # the earliest deadline the sweep heap holds for this row
    steps: dict[str, bytes] = field(default_factory=dict)  # 'p:<name>' fields in Redis

    def keep_ttl(self, now: int, ttl_ms: int) -> None:
        """A record still in play lives at least ``ttl_ms`` more, never less than before."""
        self.expires_ms = max(self.expires_ms, now + ttl_ms)

    def set_ttl(self, now: int, ttl_ms: int) -> None:
        """A terminal record lives exactly ``ttl_ms`` more."""
        self.expires_ms = now + ttl_ms

    def finish(self, state: State, now: int, ttl_ms: int) -> None:
        """Make the record terminal, keeping what a finished record keeps in Redis (``finish``
        in the scripts): no lease, holder, deliveries, result TTL or created time."""
        self.state, self.updated_ms = state, now
        self.holder, self.lease_until_ms, self.deliveries = "", 0, 0
        self.grace_ms, self.created_ms = 0, 0
        self.set_ttl(now, ttl_ms)


def _conflicts(stored: str, given: str) -> bool:
    return bool(given) and bool(stored) and stored != given


class MemoryStore:
    """An in-process store; ``clock`` returns seconds (wall time by default)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._rows: dict[str, _Row] = {}
        self._deadlines: list[tuple[int, str]] = []  # heap: (expires_ms, key), may be stale
        self._lock = threading.Lock()

    def records_held(self) -> int:
        """How many records the store holds in memory (expired ones are swept by every
        operation, so this counts them only until the next one)."""
        return len(self._rows)

    def _now(self) -> int:
        """The time in ms, after dropping every record that expired by then."""
        now = int(self._clock() * 1000)
        self._sweep(now)
        return now

    def _sweep(self, now: int) -> None:
        """Drop the records whose deadline passed: O(log n) per record and per write.

        Each row has a heap entry at ``swept_at_ms``, never after its deadline. An entry
        that comes due for a row whose TTL was extended meanwhile is pushed again at the new
        deadline, so renewals do not grow the heap; entries of forgotten rows are skipped.
        """
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            due, key = heapq.heappop(heap)
            row = self._rows.get(key)
            if row is None:
                continue
            if row.expires_ms <= now:
                del self._rows[key]
            elif row.swept_at_ms == due:
                self._track(key, row, again=True)

    def _track(self, key: str, row: _Row, *, again: bool = False) -> None:
        """After a write: give the heap an entry for ``row`` no later than its deadline."""
        if again or row.swept_at_ms == 0 or row.expires_ms < row.swept_at_ms:
            row.swept_at_ms = row.expires_ms
            heapq.heappush(self._deadlines, (row.expires_ms, key))

    def _live(self, key: str, now: int) -> _Row | None:
        row = self._rows.get(key)
        if row is not None and row.expires_ms <= now:
            del self._rows[key]
            return None
        return row

    def reserve(
        self,
        key: str,
        *,
        task_id: str,
        task_name: str,
        fingerprint: str,
        reservation_ms: int,
        ttl_ms: int,
    ) -> ReserveAnswer:
        with self._lock:
            now = self._now()
            row = self._live(key, now)
            if row is not None:
                if _conflicts(row.fingerprint, fingerprint):
                    return Conflict(row.task_id)
                if row.state is State.DONE:
                    return Duplicate(row.task_id, row.state, row.result)
                if row.state is State.FAILED or (
                    row.state in (State.QUEUED, State.RUNNING) and row.lease_until_ms > now
                ):
                    return Duplicate(row.task_id, row.state)
            else:
                row = self._rows[key] = _blank(now)
            row.state, row.task_id, row.task_name = State.QUEUED, task_id, task_name
            row.lease_until_ms, row.updated_ms = now + reservation_ms, now
            if fingerprint:
                row.fingerprint = fingerprint
            row.keep_ttl(now, max(ttl_ms, reservation_ms))
            self._track(key, row)
            return New(task_id)

    def cancel(self, key: str, *, task_id: str) -> CancelAnswer:
        with self._lock:
            now = self._now()
            row = self._live(key, now)
            if row is not None and row.state is State.QUEUED and row.task_id == task_id:
                row.state, row.lease_until_ms, row.updated_ms = State.IDLE, 0, now
                return Released(task_id)
            return _stale(row)

    def acquire(
        self,
        key: str,
        *,
        task_id: str,
        attempt_id: str,
        task_name: str,
        fingerprint: str,
        lease_ms: int,
        max_deliveries: int,
        ttl_ms: int,
    ) -> AcquireAnswer:
        with self._lock:
            now = self._now()
            row = self._live(key, now)
            takeover = False
            if row is not None:
                if _conflicts(row.fingerprint, fingerprint):
                    return Conflict(row.task_id)
                if row.state is State.DONE:
                    return Done(row.task_id, row.result)
                if row.state is State.FAILED:
                    return Failed(row.task_id, row.error)
                if row.state is State.RUNNING:
                    if row.lease_until_ms > now:
                        return Busy(row.task_id, row.lease_until_ms - now)
                    takeover = True
            else:
                row = self._rows[key] = _blank(now)
            if row.deliveries >= max_deliveries:
                deliveries = row.deliveries
                row.error = f"poison: {deliveries} deliveries ended without a result"
                row.finish(State.FAILED, now, ttl_ms)
                self._track(key, row)
                return Poisoned(row.task_id, deliveries, row.error)
            row.token += 1
            row.deliveries += 1
            row.state, row.task_id, row.task_name, row.holder = (
                State.RUNNING,
                task_id,
                task_name,
                attempt_id,
            )
            row.lease_until_ms, row.updated_ms, row.grace_ms = now + lease_ms, now, ttl_ms
            row.keep_ttl(now, lease_ms + ttl_ms)
            self._track(key, row)
            if fingerprint:
                row.fingerprint = fingerprint
            return Acquired(task_id, row.token, takeover, row.deliveries)

    def _held(self, key: str, attempt_id: str, token: int, now: int) -> _Row | None:
        row = self._live(key, now)
        if (
            row is not None
            and row.state is State.RUNNING
            and row.holder == attempt_id
            and row.token == token
        ):
            return row
        return None

    def renew(self, lease: Lease) -> bool:
        return self.renew_many([lease])[0]

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        answers = []
        with self._lock:
            now = self._now()
            for lease in leases:
                row = self._held(lease.key, lease.attempt_id, lease.token, now)
                if row is not None:
                    row.lease_until_ms = now + lease.lease_ms
                    row.keep_ttl(now, lease.lease_ms + row.grace_ms)  # never lowered: no _track
                answers.append(row is not None)
        return answers

    def complete(
        self,
        key: str,
        *,
        attempt_id: str,
        token: int,
        result: bytes | None,
        result_ttl_ms: int,
    ) -> CompleteAnswer:
        with self._lock:
            now = self._now()
            row = self._held(key, attempt_id, token, now)
            if row is None:
                current = self._live(key, now)
                return _stale(current, current.result if current else None)
            row.error = ""
            row.result = None if result is None else StoredResult(result)
            row.finish(State.DONE, now, result_ttl_ms)
            self._track(key, row)
            return Completed(row.task_id)

    def release(
        self,
        key: str,
        *,
        attempt_id: str,
        token: int,
        error: str,
        terminal: bool,
        ttl_ms: int,
    ) -> ReleaseAnswer:
        with self._lock:
            now = self._now()
            row = self._held(key, attempt_id, token, now)
            if row is None:
                return _stale(self._live(key, now))
            row.error = error
            if terminal:
                row.finish(State.FAILED, now, ttl_ms)
            else:
                row.state, row.holder, row.lease_until_ms, row.deliveries = State.IDLE, "", 0, 0
                row.updated_ms = now
                row.keep_ttl(now, ttl_ms)
            self._track(key, row)
            return Released(row.task_id)

    def inspect(self, key: str) -> Record | None:
        with self._lock:
            now = self._now()
            row = self._live(key, now)
            return None if row is None else _record(key, row, now)

    def forget(self, key: str) -> bool:
        with self._lock:
            return self._live(key, self._now()) is not None and self._rows.pop(key) is not None

    def scan(self, *, batch: int = 500) -> Iterator[Record]:
        with self._lock:
            now = self._now()
            records = [
                _record(key, row, now)
                for key in list(self._rows)
                if (row := self._live(key, now)) is not None
            ]
        yield from records

    def ping(self) -> None:
        return None

    def record_step(
        self, key: str, *, attempt_id: str, token: int, name: str, value: bytes
    ) -> StepAnswer:
        with self._lock:
            now = self._now()
            row = self._held(key, attempt_id, token, now)
            if row is None:
                return _stale(self._live(key, now))
            row.steps[name] = bytes(value)
            return Recorded(row.task_id)

    def recorded_steps(self, key: str, *, attempt_id: str, token: int) -> StepsAnswer:
        with self._lock:
            now = self._now()
            row = self._held(key, attempt_id, token, now)
            if row is None:
                return _stale(self._live(key, now))
            return Held(row.task_id, dict(row.steps))


def _stale(current: _Row | None, result: StoredResult | None = None) -> Stale:
    """The caller does not hold the key: the record as it is now (None: there is none)."""
    if current is None:
        return Stale()
    return Stale(current.task_id, current.state, result)


def _blank(now: int) -> _Row:
    return _Row(State.IDLE, "", "", "", 0, 0, "", 0, None, "", now, now, 0)


def _record(key: str, row: _Row, now: int) -> Record:
    return Record(
        key=key,
        state=row.state,
        task_id=row.task_id,
        task_name=row.task_name,
        holder=row.holder,
        token=row.token,
        lease_until_ms=row.lease_until_ms,
        fingerprint=row.fingerprint,
        deliveries=row.deliveries,
        result=row.result,
        error=row.error,
        created_ms=row.created_ms,
        updated_ms=row.updated_ms,
        ttl_ms=row.expires_ms - now,
        steps=dict(row.steps),
    )
