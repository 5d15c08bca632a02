"""The record store contract: one record per idempotency key, one atomic step per transition.

A record moves ``queued -> running -> done | failed``; ``idle`` is a record released for
another try (it keeps its fencing token). Every step checks and writes in one atomic
operation (a Lua script on Redis), so two workers never both believe they hold a key.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn, Protocol, TypeAlias, runtime_checkable

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

#: What each script answers (a Lua table is a Redis array), and the answer type ``redis.py``
#: turns each reply into (``→ Type``; ``MemoryStore`` gives the same answers). Every script
#: takes KEYS[1] = the record. Answers are the same for either layout of a record: the task
#: id comes back as text (``T`` unpacked), ``has_result`` is ``x`` where an earlier layout
#: stored it, else whether ``r`` is present; ``has_result`` and the result become one
#: ``StoredResult | None``, an empty state ``None`` (no record).
SCRIPT_REPLIES: dict[str, tuple[str, ...]] = {
    "reserve": (
        "ARGV: task_id, task_name, fingerprint, reservation_ms, ttl_ms",
        "{'new', task_id} → New",
        "{'duplicate', task_id, state, has_result, result} → Duplicate",
        "{'conflict', task_id} → Conflict",
    ),
    "cancel": (
        "ARGV: task_id",
        "{'released', task_id} → Released",
        "{'stale', task_id or '', state or ''} → Stale",
    ),
    "acquire": (
        "ARGV: task_id, attempt_id, task_name, fingerprint, lease_ms, max_deliveries, ttl_ms",
        "{'acquired', task_id, token, takeover (0/1), deliveries} → Acquired",
        "{'busy', task_id, lease ms left} → Busy",
        "{'done', task_id, has_result, result} → Done",
        "{'failed', task_id, error} → Failed",
        "{'poisoned', task_id, deliveries, error} → Poisoned",
        "{'conflict', task_id} → Conflict",
    ),
    "renew": ("ARGV: attempt_id, token, lease_ms", "1 (still held) or 0 (lost) → bool"),
    "complete": (
        "ARGV: attempt_id, token, has_result ('1'/'0'), result, ttl_ms",
        "{'completed', task_id} → Completed",
        "{'stale', task_id or '', state or '', has_result, result} → Stale (with the result)",
    ),
    "release": (
        "ARGV: attempt_id, token, error, terminal ('1'/'0'), ttl_ms",
        "{'released', task_id} → Released",
        "{'stale', task_id or '', state or ''} → Stale",
    ),
    "step": (
        "ARGV: attempt_id, token, name, value",
        "{'recorded', task_id} → Recorded",
        "{'stale', task_id or '', state or ''} → Stale",
    ),
    "steps": (
        "ARGV: attempt_id, token",
        "{'held', task_id, name, value, name, value, ...} → Held",
        "{'stale', task_id or '', state or ''} → Stale",
    ),
}


class State(str, enum.Enum):
    """Where a key's record is in its life: the record's ``s`` field (``Record.state``).

    Not what an operation answered (``Status``), nor what the guard decided
    (``idemtask.events.Decision``): an ``acquire`` that finds a ``done`` record answers
    ``Done`` (``Status.DONE``) and the guard decides ``replayed``.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    IDLE = "idle"


class Status(str, enum.Enum):
    """Which answer a store operation gave: exactly one member per answer type (``New`` ...
    ``Held``), each type's ``status``; the value is the word the Lua script replies with.

    Not a record's state (``State``) nor a guard decision (``idemtask.events.Decision``),
    though some words are shared: ``Status.DONE`` is the answer "completed before", the
    record's state is then ``State.DONE``.
    """

    NEW = "new"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    ACQUIRED = "acquired"
    BUSY = "busy"
    DONE = "done"
    FAILED = "failed"
    POISONED = "poisoned"
    COMPLETED = "completed"
    RELEASED = "released"
    STALE = "stale"
    RECORDED = "recorded"
    HELD = "held"


@dataclass(frozen=True, slots=True)
class StoredResult:
    """An encoded result. Its presence is the has-result flag: ``b"null"`` is a result."""

    data: bytes


# -- answers: one type per status, carrying only what that answer means -------------------


@dataclass(frozen=True, slots=True)
class New:
    """reserve: the caller owns a fresh reservation (``queued``) and should publish."""

    status: ClassVar[Status] = Status.NEW
    task_id: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """reserve: a live or finished record exists; ``result`` only when it is ``done``."""

    status: ClassVar[Status] = Status.DUPLICATE
    task_id: str
    state: State
    result: StoredResult | None = None


@dataclass(frozen=True, slots=True)
class Conflict:
    """reserve / acquire: the key's record was written for another payload fingerprint."""

    status: ClassVar[Status] = Status.CONFLICT
    task_id: str


@dataclass(frozen=True, slots=True)
class Acquired:
    """acquire: the caller holds the lease (``running``) and may run the body.

    ``takeover``: an expired lease of another attempt was taken; ``deliveries``: the
    deliveries in a row that took the lease, this one included."""

    status: ClassVar[Status] = Status.ACQUIRED
    task_id: str
    token: int
    takeover: bool
    deliveries: int


@dataclass(frozen=True, slots=True)
class Busy:
    """acquire: another attempt (``task_id``) holds a live lease for ``lease_left_ms``."""

    status: ClassVar[Status] = Status.BUSY
    task_id: str
    lease_left_ms: int


@dataclass(frozen=True, slots=True)
class Done:
    """acquire: the key completed before; replay ``result`` (None: none was stored)."""

    status: ClassVar[Status] = Status.DONE
    task_id: str
    result: StoredResult | None


@dataclass(frozen=True, slots=True)
class Failed:
    """acquire: the key failed terminally before; replay ``error``."""

    status: ClassVar[Status] = Status.FAILED
    task_id: str
    error: str


@dataclass(frozen=True, slots=True)
class Poisoned:
    """acquire: ``deliveries`` deliveries ended without a report; the key is now ``failed``."""

    status: ClassVar[Status] = Status.POISONED
    task_id: str
    deliveries: int
    error: str


@dataclass(frozen=True, slots=True)
class Completed:
    """complete: the result is recorded; the record is ``done``."""

    status: ClassVar[Status] = Status.COMPLETED
    task_id: str


@dataclass(frozen=True, slots=True)
class Released:
    """release / cancel: the key is given back (``idle``, or ``failed`` for a terminal
    release)."""

    status: ClassVar[Status] = Status.RELEASED
    task_id: str


@dataclass(frozen=True, slots=True)
class Stale:
    """The caller no longer holds the key (or, for cancel, its reservation): nothing was
    written. ``state`` is the record's now (None: there is none); ``result`` is the stored
    one, given by ``complete`` only, so a late completion can replay the winner's."""

    status: ClassVar[Status] = Status.STALE
    task_id: str = ""
    state: State | None = None
    result: StoredResult | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """record_step: the holder's step value is recorded."""

    status: ClassVar[Status] = Status.RECORDED
    task_id: str


@dataclass(frozen=True, slots=True)
class Held:
    """recorded_steps: the caller holds the lease; ``steps`` maps name -> encoded value."""

    status: ClassVar[Status] = Status.HELD
    task_id: str
    steps: Mapping[str, bytes] = field(default_factory=dict)


ReserveAnswer: TypeAlias = New | Duplicate | Conflict
CancelAnswer: TypeAlias = Released | Stale
AcquireAnswer: TypeAlias = Acquired | Busy | Done | Failed | Poisoned | Conflict
CompleteAnswer: TypeAlias = Completed | Stale
ReleaseAnswer: TypeAlias = Released | Stale
StepAnswer: TypeAlias = Recorded | Stale
StepsAnswer: TypeAlias = Held | Stale
#: Any answer of a transition; ``status`` names which.
Answer: TypeAlias = (
    New
    | Duplicate
    | Conflict
    | Acquired
    | Busy
    | Done
    | Failed
    | Poisoned
    | Completed
    | Released
    | Stale
    | Recorded
    | Held
)

if sys.version_info >= (3, 11):
    from typing import assert_never
else:

    def assert_never(value: NoReturn) -> NoReturn:
        """``typing.assert_never`` before 3.11: mypy rejects a call it can reach."""
        raise AssertionError(f"unhandled answer {value!r}")


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
    ) -> ReserveAnswer:
        """Enqueue side: absent, idle or an expired reservation/lease -> ``queued`` (``New``)."""
        ...

    def cancel(self, key: str, *, task_id: str) -> CancelAnswer:
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
    ) -> AcquireAnswer:
        """Execute side: take the lease (token + 1, ``Acquired``) or say why not."""
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
    ) -> CompleteAnswer:
        """Record success (``Completed``), or ``Stale`` with the record's state and result."""
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
    ) -> ReleaseAnswer:
        """Give the key back: ``idle`` for another try, or ``failed`` when ``terminal``."""
        ...

    def record_step(
        self, key: str, *, attempt_id: str, token: int, name: str, value: bytes
    ) -> StepAnswer:
        """The holder records a step's value (``Recorded``); anyone else: ``Stale``."""
        ...

    def recorded_steps(self, key: str, *, attempt_id: str, token: int) -> StepsAnswer:
        """``Held`` with the steps recorded so far (``Held.steps``), or ``Stale``."""
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
