"""The record store contract: one record per idempotency key, one atomic step per transition.

A record moves ``queued -> running -> done | failed``; ``idle`` is a record released for
another try (it keeps its fencing token). Every step checks and writes in one atomic
operation (a Lua script on Redis), so two workers never both believe they hold a key.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

#: The record's hash fields in Redis (``{prefix}:{<key>}``), for readers of the Lua scripts,
#: ``redis.py`` and ``redis-cli HGETALL``. Times are server milliseconds (Redis ``TIME``).
#: A finished record (done, failed) keeps only ``s``, the task id, the fingerprint, ``n``,
#: ``k``, ``u`` and ``r`` or ``e`` (and any ``p:`` steps): the others are dropped by the
#: transition that finishes it (``finish`` in ``lua/_prelude.lua``), since no later
#: transition reads them, and the task id and fingerprint are packed (``T``, ``F``) when
#: they have the usual shape. A small done record then fits a 128-byte listpack.
RECORD_FIELDS: dict[str, str] = {
    "s": "state: queued, running, done, failed or idle",
    "t": "task id (the framework's message or task id), as text",
    "T": "finished records: a lowercase UUID task id as its 16 bytes, in place of t",
    "f": "payload fingerprint as text ('' or absent: not validated)",
    "F": "finished records: a lowercase hex fingerprint as its raw bytes, in place of f",
    "l": "deadline of the lease (running) or of the reservation (queued); 0 or absent: none",
    "r": "the encoded result; present exactly when a result is stored, so a stored null "
    "differs from no result",
    "x": "read only, in records finished before the compact layout: has-result flag, "
    "'1' or '0' (a finished record no longer writes it; r's presence is the flag)",
    "k": "fencing token, + 1 on every acquire that hands out a lease (kept when finished)",
    "d": "deliveries in a row that took the lease and never reported back (absent: 0)",
    "e": "error: the terminal or poison error, or the last retryable one",
    "h": "holder: the attempt id of the lease (absent once released or finished)",
    "n": "task name",
    "c": "created at (absent once finished)",
    "u": "updated at (every transition but renew; a finished record's is when it finished)",
    "g": "the result TTL (ms) the record outlives its lease by: set by acquire, read by "
    "renew; absent once finished",
    "p:": "p:<name>: the encoded value of the body's step <name> (idemtask.step), written by "
    "the holder; in the record's own hash, so its TTL covers it and forget removes it",
}

#: What each script answers (a Lua table is a Redis array); ``redis.py`` turns it into an
#: ``Outcome``. Every script takes KEYS[1] = the record. Answers are the same for either
#: layout of a record: the task id comes back as text (``T`` unpacked), ``has_result`` is
#: ``x`` where an earlier layout stored it, else whether ``r`` is present.
SCRIPT_REPLIES: dict[str, tuple[str, ...]] = {
    "reserve": (
        "ARGV: task_id, task_name, fingerprint, reservation_ms, ttl_ms",
        "{'new', task_id}",
        "{'duplicate', task_id, state, has_result, result}",
        "{'conflict', task_id}",
    ),
    "cancel": (
        "ARGV: task_id",
        "{'released', task_id}",
        "{'stale', task_id or '', state or ''}",
    ),
    "acquire": (
        "ARGV: task_id, attempt_id, task_name, fingerprint, lease_ms, max_deliveries, ttl_ms",
        "{'acquired', task_id, token, takeover (0/1), deliveries}",
        "{'busy', task_id, lease ms left}",
        "{'done', task_id, has_result, result}",
        "{'failed', task_id, error}",
        "{'poisoned', task_id, deliveries, error}",
        "{'conflict', task_id}",
    ),
    "renew": ("ARGV: attempt_id, token, lease_ms", "1 (still held) or 0 (lost)"),
    "complete": (
        "ARGV: attempt_id, token, has_result ('1'/'0'), result, ttl_ms",
        "{'completed', task_id}",
        "{'stale', task_id or '', state or '', has_result, result}",
    ),
    "release": (
        "ARGV: attempt_id, token, error, terminal ('1'/'0'), ttl_ms",
        "{'released', task_id}",
        "{'stale', task_id or '', state or ''}",
    ),
    "step": (
        "ARGV: attempt_id, token, name, value",
        "{'recorded', task_id}",
        "{'stale', task_id or '', state or ''}",
    ),
    "steps": (
        "ARGV: attempt_id, token",
        "{'held', task_id, name, value, name, value, ...}",
        "{'stale', task_id or '', state or ''}",
    ),
}


class State(str, enum.Enum):
    """Where a key's record is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    IDLE = "idle"


class Status(str, enum.Enum):
    """What a store operation answered."""

    NEW = "new"  # reserve: the caller owns a fresh reservation and should publish
    DUPLICATE = "duplicate"  # reserve: a live or finished record exists
    CONFLICT = "conflict"  # reserve/acquire: same key, different payload fingerprint
    ACQUIRED = "acquired"  # acquire: the caller holds the lease and may run the body
    BUSY = "busy"  # acquire: another attempt holds a live lease
    DONE = "done"  # acquire: completed before; replay the stored result
    FAILED = "failed"  # acquire: failed terminally before; replay the stored error
    POISONED = "poisoned"  # acquire: too many deliveries ended without a report; now failed
    COMPLETED = "completed"  # complete: the result is recorded
    RELEASED = "released"  # release / cancel: the record is idle (or failed) again
    STALE = "stale"  # renew/complete/release/cancel/steps: the caller no longer holds it
    RECORDED = "recorded"  # record_step: the step's value is recorded
    HELD = "held"  # recorded_steps: the caller holds the lease; ``steps`` are recorded


@dataclass(frozen=True, slots=True)
class StoredResult:
    """An encoded result. Its presence is the has-result flag: ``b"null"`` is a result."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer of one transition; fields not relevant to ``status`` keep their defaults."""

    status: Status
    task_id: str = ""
    state: State | None = None
    token: int = 0
    takeover: bool = False
    lease_left_ms: int = 0
    deliveries: int = 0
    result: StoredResult | None = None
    error: str = ""
    steps: Mapping[str, bytes] = field(default_factory=dict)  # recorded_steps: name -> value


@dataclass(frozen=True, slots=True)
class Lease:
    """What one attempt holds; the lease keeper renews these in bulk."""

    key: str
    attempt_id: str
    token: int
    lease_ms: int


@dataclass(frozen=True, slots=True)
class Record:
    """A read-only view of a key's record, for inspection and admin tools."""

    key: str
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
    ttl_ms: int
    steps: Mapping[str, bytes] = field(default_factory=dict)  # step name -> encoded value


@runtime_checkable
class Store(Protocol):
    """Operations every store implements with the same semantics (see the contract tests)."""

    def reserve(
        self,
        key: str,
        *,
        task_id: str,
        task_name: str,
        fingerprint: str,
        reservation_ms: int,
        ttl_ms: int,
    ) -> Outcome:
        """Enqueue side: absent, idle or an expired reservation/lease -> ``queued`` (NEW)."""
        ...

    def cancel(self, key: str, *, task_id: str) -> Outcome:
        """Undo a reservation whose publish failed: ``queued`` by ``task_id`` -> ``idle``."""
        ...

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
    ) -> Outcome:
        """Execute side: take the lease (token + 1) or say why not."""
        ...

    def renew(self, lease: Lease) -> bool:
        """Extend a held lease; False when the caller no longer holds it."""
        ...

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        """Renew several leases in one round trip."""
        ...

    def complete(
        self,
        key: str,
        *,
        attempt_id: str,
        token: int,
        result: bytes | None,
        result_ttl_ms: int,
    ) -> Outcome:
        """Record success (COMPLETED), or STALE with the record's current state and result."""
        ...

    def release(
        self,
        key: str,
        *,
        attempt_id: str,
        token: int,
        error: str,
        terminal: bool,
        ttl_ms: int,
    ) -> Outcome:
        """Give the key back: ``idle`` for another try, or ``failed`` when ``terminal``."""
        ...

    def record_step(
        self, key: str, *, attempt_id: str, token: int, name: str, value: bytes
    ) -> Outcome:
        """The holder records a step's value under the key (RECORDED); anyone else: STALE."""
        ...

    def recorded_steps(self, key: str, *, attempt_id: str, token: int) -> Outcome:
        """HELD with the steps recorded so far (``Outcome.steps``), or STALE."""
        ...

    def inspect(self, key: str) -> Record | None:
        """The record for ``key``, or None."""
        ...

    def forget(self, key: str) -> bool:
        """Delete the record (admin); True if there was one."""
        ...

    def scan(self, *, batch: int = 500) -> Iterator[Record]:
        """Every record, in batches (never a blocking full listing)."""
        ...

    def ping(self) -> None:
        """Raise ``StoreUnavailable`` when the store cannot be reached."""
        ...
