"""The framework-neutral engine: what to do at enqueue, at execute start, and at the end.

Adapters translate framework events into calls on this module and its answers back into
framework actions. Publishing goes through ``Guard.publishing`` (reserve, let the adapter
publish, give the reservation back if that fails); every delivery goes through one
``Delivery`` (decide, run the body under its lease, record the outcome). ``Deferred`` and
``Dropped`` tell the adapter to put the message back for later or to ack it unrun; every
other answer is a value or an ``IdempotencyError``. Nothing outside this module touches
leases or calls the store for a task.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from idemtask import context
from idemtask.codecs import Codec, JsonCodec
from idemtask.errors import (
    AlreadyRunningError,
    DuplicateTaskError,
    IdempotencyConflict,
    KeyDerivationError,
    LeaseLostError,
    PoisonMessageError,
    ResultTooLargeError,
    StepStoreUnavailable,
    StoreUnavailable,
    TaskFailedError,
)
from idemtask.events import Decision, emit
from idemtask.identity import Call, Identity
from idemtask.lease import LeaseKeeper
from idemtask.policy import Policy
from idemtask.steps import StepLog
from idemtask.store.base import (
    AcquireAnswer,
    Acquired,
    Busy,
    Completed,
    Conflict,
    Done,
    Duplicate,
    Failed,
    Lease,
    New,
    Poisoned,
    Released,
    ReserveAnswer,
    Stale,
    State,
    Store,
    StoredResult,
    assert_never,
)

__all__ = [
    "Attempt",
    "Call",
    "Deferred",
    "Delivery",
    "Dropped",
    "Existing",
    "Guard",
    "Replay",
    "busy_delay",
    "final_exceptions",
    "inline",
]

logger = logging.getLogger("idemtask")

A = TypeVar("A")  # a store answer

STORE_RETRY_DELAY = 5.0  # seconds a message waits when the store cannot be reached
#: A busy copy's first look again comes this soon (most holders finish within moments) and
#: each later one twice as late, up to ``MAX_BUSY_DELAY``: the copy learns of the holder's
#: end within that much, asking the store at most a few times a second (``busy_delay``).
MIN_BUSY_DELAY = 0.05
MAX_BUSY_DELAY = 0.25

#: Errors a retry cannot change: the key failed for good, its payload conflicts, or the
#: arguments cannot be keyed. Adapters fail such a delivery at once instead of retrying it.
UNRETRYABLE: tuple[type[BaseException], ...] = (
    TaskFailedError,
    IdempotencyConflict,
    KeyDerivationError,
)


def inline(policy: Policy) -> Policy:
    """The policy for a delivery run in the caller's thread (Celery's eager mode): there is
    no broker to defer to, so wait (bounded by ``wait_timeout``) and let a store error
    surface."""
    return replace(
        policy,
        on_running="wait" if policy.on_running == "defer" else policy.on_running,
        on_store_error="raise" if policy.on_store_error == "defer" else policy.on_store_error,
    )


def final_exceptions(policy: Policy) -> tuple[type[BaseException], ...]:
    """Exceptions after which a framework retry would only replay the same outcome."""
    return (*UNRETRYABLE, *policy.terminal_exceptions)


@dataclass(frozen=True, slots=True)
class Existing:
    """A duplicate enqueue's answer: the original task id, and its result when done."""

    task_id: str
    state: State | None
    result: StoredResult | None


class Deferred(Exception):
    """Put this message back on the broker to be delivered again after ``delay`` seconds.

    ``deferrals``: how often the message will have been deferred, this time included; the
    adapter carries it on the copy it publishes (``identity.count_deferrals``) and hands it
    back to ``Guard.delivery``, so the copy's next deferral is the next step of
    ``busy_delay``'s schedule. None: carry the message's count unchanged."""

    def __init__(self, delay: float, reason: str, *, deferrals: int | None = None) -> None:
        self.delay = delay
        self.reason = reason
        self.deferrals = deferrals
        super().__init__(f"deferred {delay:.2f}s: {reason}")


class Dropped(Exception):
    """Ack this message without running the body (``on_running="drop"``)."""


@dataclass(frozen=True, slots=True)
class Replay:
    """The key completed before: hand back its stored result instead of running the body."""

    call: Call
    task_id: str
    result: StoredResult | None

    def value(self, codec: Codec) -> Any:
        """The stored result; a completion recorded without one (an oversized result, before
        such results failed the key) has no answer to give, and says so."""
        if self.result is None:
            raise TaskFailedError(
                self.call.key,
                self.task_id,
                "completed without a stored result (larger than max_result_bytes when it was "
                "recorded); forget the key to run it again",
            )
        return codec.decode(self.result.data)


@dataclass(slots=True)
class Attempt:
    """The right to run the body once. ``guarded`` is False only when the store was down and
    ``on_store_error="run"`` let the body run anyway."""

    call: Call
    policy: Policy
    task_id: str
    attempt_id: str
    token: int
    takeover: bool
    guarded: bool = True
    execution: context.Execution = field(init=False)

    def __post_init__(self) -> None:
        self.execution = context.Execution(
            key=self.call.key,
            task_name=self.call.task_name,
            task_id=self.task_id,
            attempt_id=self.attempt_id,
            fencing_token=self.token,
            takeover=self.takeover,
        )


class Guard:
    """Decisions over one store; one instance per store per process is enough."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.leases = LeaseKeeper(store)

    # -- enqueue -------------------------------------------------------------------------

    @contextlib.contextmanager
    def publishing(
        self, policy: Policy, call: Call, task_id: str, *, delay: float = 0.0, reserve: bool = True
    ) -> Iterator[Existing | None]:
        """Reserve the key, then let the adapter publish inside the block.

        Yields None: publish ``task_id``; an ``Existing``: hand back the original instead
        (nothing was reserved). If the block raises, the reservation is given back so a later
        call can publish. ``reserve=False`` (canvas members, retries) publishes unreserved.
        """
        existing = self.reserve(policy, call, task_id, delay=delay) if reserve else None
        if existing is not None:
            yield existing
            return
        try:
            yield None
        except BaseException:
            if reserve and policy.dedupe_enqueue:
                self.cancel(call, task_id)
            raise

    def reserve(
        self, policy: Policy, call: Call, task_id: str, *, delay: float = 0.0
    ) -> Existing | None:
        """None: publish ``task_id``. An ``Existing``: hand back the original instead.

        ``delay`` is how long the message waits before delivery (countdown, ETA, delayed
        send): its reservation lasts that much longer.
        """
        if not policy.dedupe_enqueue:
            return None
        started = time.perf_counter()
        try:
            answer = self.store.reserve(
                call.key,
                task_id=task_id,
                task_name=call.task_name,
                fingerprint=_fingerprint(policy, call),
                reservation_ms=policy.reservation_ms + max(0, int(delay * 1000)),
                ttl_ms=policy.result_ttl_ms,
            )
        except StoreUnavailable as exc:
            emit(Decision.STORE_UNAVAILABLE, call, task_id, stage="enqueue")
            if policy.on_store_error == "raise":
                raise
            # The execute guard still protects the message; publishing loses nothing.
            logger.debug("idemtask enqueue without reservation: %s", exc)
            return None
        return self._reserved(policy, call, task_id, answer, time.perf_counter() - started)

    def _reserved(
        self, policy: Policy, call: Call, task_id: str, answer: ReserveAnswer, took: float
    ) -> Existing | None:
        match answer:
            case New():
                emit(Decision.NEW, call, task_id, duration=took)
                return None
            case Conflict(task_id=holder):
                emit(Decision.CONFLICT, call, task_id, existing=holder)
                raise IdempotencyConflict(call.key, holder)
            case Duplicate():
                return self._duplicate(policy, call, task_id, answer, took)
            case _:
                assert_never(answer)

    def _duplicate(
        self, policy: Policy, call: Call, task_id: str, duplicate: Duplicate, took: float
    ) -> Existing | None:
        state = duplicate.state.value
        emit(
            Decision.DUPLICATE,
            call,
            task_id,
            duration=took,
            existing=duplicate.task_id,
            state=state,
            policy=policy.on_duplicate,
        )
        if policy.on_duplicate == "raise":
            raise DuplicateTaskError(call.key, duplicate.task_id, state)
        if policy.on_duplicate == "enqueue":
            return None
        return Existing(duplicate.task_id, duplicate.state, duplicate.result)

    def cancel(self, call: Call, task_id: str) -> None:
        """Give back a reservation whose publish failed, so a later call can publish."""
        try:
            self.store.cancel(call.key, task_id=task_id)
        except StoreUnavailable:
            logger.warning(
                "idemtask could not cancel reservation %s of %s; it expires on its own",
                call.key,
                call.task_name,
            )

    def unreserve(self, identity: Identity, fields: Mapping[str, Any] | None, task_id: str) -> None:
        """Give back the reservation of a message the framework dropped before any delivery
        decided it (revoked, expired, skipped by another middleware): no delivery will run it,
        and until ``reservation_ttl`` every duplicate call would get its handle. Only a key
        this very message carries is given back."""
        call = identity.carried(fields, task_id)
        if call is not None:
            self.cancel(call, task_id)

    # -- execute -------------------------------------------------------------------------

    def delivery(
        self,
        policy: Policy,
        call: Call,
        task_id: str,
        codec: Codec,
        *,
        follows: str | None = None,
        resumes: tuple[str, int] | None = None,
        deferrals: int = 0,
    ) -> Delivery:
        """The lifecycle of one delivery, for the adapter to drive.

        ``follows``: the attempt id this message was published by (a retry sent while its
        body still runs); ``resumes``: ``(attempt id, token)`` of an attempt that handed its
        key over to this message (a replacement); ``deferrals``: how often this message was
        deferred before (the count a ``Deferred`` hands the adapter to carry). See ``begin``
        and ``resume``.
        """
        return Delivery(
            self,
            policy,
            call,
            task_id,
            codec,
            follows=follows,
            resumes=resumes,
            deferrals=deferrals,
        )

    def begin(
        self,
        policy: Policy,
        call: Call,
        task_id: str,
        *,
        follows: str | None = None,
        deferrals: int = 0,
    ) -> Attempt | Replay:
        """Decide one delivery: an ``Attempt`` to run, or a ``Replay``.

        Raises ``Deferred`` / ``Dropped`` for the adapter to act on, and
        AlreadyRunningError, TaskFailedError, IdempotencyConflict or StoreUnavailable.
        A message that ``follows`` the attempt still holding the key waits for it, then
        defers, whatever ``on_running`` says: it is that attempt's own continuation, not a
        duplicate, and dropping or failing it would lose the retry. ``deferrals`` (how often
        the message was deferred before) and the polls of a wait so far place the next look
        on ``busy_delay``'s schedule.
        """
        deadline = time.monotonic() + policy.wait_timeout
        tries = deferrals
        while True:
            attempt_id = _attempt_id()
            started = time.perf_counter()
            answer = self._acquire(policy, call, task_id, attempt_id, tries)
            if answer is None:  # store down, on_store_error="run"
                return Attempt(call, policy, task_id, attempt_id, 0, False, guarded=False)
            took = time.perf_counter() - started
            if not isinstance(answer, Busy):
                return self._decided(policy, call, task_id, answer, attempt_id, took)
            on_running = policy.on_running
            if follows is not None and self._held_by(call, follows):
                on_running = "wait"
            time.sleep(self._busy(policy, call, task_id, answer, deadline, tries, on_running))
            tries += 1

    def _held_by(self, call: Call, attempt_id: str) -> bool:
        """Whether the key is held by ``attempt_id`` or by no one any more (it finished since
        the busy answer): a follower then asks again instead of applying ``on_running``."""
        try:
            record = self.store.inspect(call.key)
        except StoreUnavailable:
            return False
        return record is None or record.state is not State.RUNNING or record.holder == attempt_id

    def _busy(
        self,
        policy: Policy,
        call: Call,
        task_id: str,
        busy: Busy,
        deadline: float,
        tries: int,
        on_running: str | None = None,
    ) -> float:
        """Another attempt holds the key: how long to wait before asking again, or raise.
        ``tries``: how many times this message found it busy before."""
        on_running = on_running or policy.on_running
        left = max(busy.lease_left_ms / 1000.0, MIN_BUSY_DELAY)
        holder = busy.task_id
        emit(
            Decision.BUSY,
            call,
            task_id,
            holder=holder,
            lease_left_ms=busy.lease_left_ms,
            policy=on_running,
        )
        if on_running == "raise":
            raise AlreadyRunningError(call.key, holder, left)
        if on_running == "drop":
            emit(Decision.DROPPED, call, task_id, holder=holder)
            raise Dropped(f"{call.key} is running as {holder}")
        delay = busy_delay(tries, left)
        remaining = deadline - time.monotonic()
        if on_running == "wait" and remaining > 0:
            return min(delay, remaining)
        emit(Decision.DEFERRED, call, task_id, delay=round(delay, 3), deferrals=tries + 1)
        raise Deferred(delay, f"{call.key} is running as {holder}", deferrals=tries + 1)

    def _acquire(
        self, policy: Policy, call: Call, task_id: str, attempt_id: str, tries: int = 0
    ) -> AcquireAnswer | None:
        """The store's answer; None when the store is down and the policy says run anyway."""
        try:
            return self.store.acquire(
                call.key,
                task_id=task_id,
                attempt_id=attempt_id,
                task_name=call.task_name,
                fingerprint=_fingerprint(policy, call),
                lease_ms=policy.lease_ms,
                max_deliveries=policy.max_deliveries,
                ttl_ms=policy.result_ttl_ms,
            )
        except StoreUnavailable:
            policy_choice = policy.on_store_error
            emit(Decision.STORE_UNAVAILABLE, call, task_id, stage="execute", policy=policy_choice)
            if policy_choice == "run":
                return None
            if policy_choice == "raise":
                raise
        emit(
            Decision.DEFERRED,
            call,
            task_id,
            delay=STORE_RETRY_DELAY,
            reason="store unavailable",
            deferrals=tries + 1,
        )
        raise Deferred(
            STORE_RETRY_DELAY, "the idempotency store is unreachable", deferrals=tries + 1
        )

    def _decided(
        self,
        policy: Policy,
        call: Call,
        task_id: str,
        answer: Acquired | Done | Failed | Poisoned | Conflict,
        attempt_id: str,
        took: float,
    ) -> Attempt | Replay:
        """Any answer of ``acquire`` but ``Busy``: run the body, replay, or raise."""
        match answer:
            case Acquired(token=token, takeover=takeover, deliveries=deliveries):
                decision = Decision.TAKEOVER if takeover else Decision.ACQUIRED
                emit(decision, call, task_id, duration=took, token=token, deliveries=deliveries)
                return Attempt(call, policy, task_id, attempt_id, token, takeover)
            case Done(task_id=holder, result=result):
                emit(Decision.REPLAYED, call, task_id, duration=took, original=holder)
                return Replay(call, holder, result)
            case Conflict(task_id=holder):
                emit(Decision.CONFLICT, call, task_id, existing=holder)
                raise IdempotencyConflict(call.key, holder)
            case Poisoned(task_id=holder, deliveries=deliveries, error=error):
                emit(Decision.POISON, call, task_id, deliveries=deliveries)
                raise PoisonMessageError(call.key, holder, error)
            case Failed(task_id=holder, error=error):
                emit(Decision.FAILED, call, task_id, original=holder)
                raise TaskFailedError(call.key, holder, error)
            case _:
                assert_never(answer)

    def resume(
        self, policy: Policy, call: Call, task_id: str, attempt_id: str, token: int
    ) -> Attempt | None:
        """Take over an attempt handed to this message, if it still holds the key: its lease
        is renewed under the same attempt id and token. None when it no longer holds it (its
        lease was taken over, or the key was given back): decide with ``begin`` instead."""
        lease = Lease(call.key, attempt_id, token, policy.lease_ms)
        try:
            held = self.store.renew(lease)
        except StoreUnavailable:
            return None
        if not held:
            return None
        emit(Decision.ACQUIRED, call, task_id, token=token, resumed=True)
        return Attempt(call, policy, task_id, attempt_id, token, False)

    @contextlib.contextmanager
    def holding(self, attempt: Attempt, codec: Codec | None = None) -> Iterator[context.Execution]:
        """Run the body inside this: renews the lease and sets ``idemtask.current()``.

        ``codec`` (the one results use) encodes the body's steps (``idemtask.step``)."""
        if attempt.guarded:
            lease = Lease(
                attempt.call.key, attempt.attempt_id, attempt.token, attempt.policy.lease_ms
            )
            self.leases.hold(lease, lambda: self._lost(attempt))
            attempt.execution.steps = StepLog(
                self.store,
                attempt.execution,
                codec or JsonCodec(),
                attempt.policy.max_result_bytes,
                functools.partial(self._with_store_retries, attempt),
                fail_open=attempt.policy.on_store_error == "run",
            )
        token = context.activate(attempt.execution)
        try:
            yield attempt.execution
        finally:
            context.deactivate(token)
            if attempt.guarded:
                self.leases.drop(attempt.attempt_id)

    def _lost(self, attempt: Attempt) -> None:
        attempt.execution.mark_lease_lost()
        emit(Decision.LEASE_LOST, attempt.call, attempt.task_id, token=attempt.token)

    def succeed(self, attempt: Attempt, value: Any, codec: Codec) -> Any:
        """Record the body's value; returns what the caller should see (its own value, or the
        value recorded by the attempt that took the key over)."""
        if not attempt.guarded:
            return value
        call, policy = attempt.call, attempt.policy
        try:
            data = _encode(codec, value, call, policy.max_result_bytes)
        except Exception as exc:
            # One key, one answer: a value no later handle could be given (the codec refuses
            # it, or the store would not hold it) fails the key for good, and this delivery
            # answers with the same error every later one replays.
            error = _error_text(exc)
            self._release(attempt, error, terminal=True)
            raise TaskFailedError(call.key, attempt.task_id, error) from exc
        answer = self._with_store_retries(
            attempt,
            lambda: self.store.complete(
                call.key,
                attempt_id=attempt.attempt_id,
                token=attempt.token,
                result=data,
                result_ttl_ms=policy.result_ttl_ms,
            ),
        )
        match answer:
            case None:
                self._unrecorded(attempt, "completion")
                return value
            case Completed():
                emit(Decision.COMPLETED, call, attempt.task_id, token=attempt.token)
                return value
            case Stale():
                return self._completed_late(attempt, answer, codec)
            case _:
                assert_never(answer)

    def _unrecorded(
        self, attempt: Attempt, outcome: str, error: StoreUnavailable | None = None
    ) -> None:
        """The key's outcome (its completion, a terminal failure, a step) never landed: the
        record still says ``running``. Answering now would let the framework ack the only
        message that can still record the key, so it is kept (deferred; it runs again once
        the lease ends) or failed with ``error`` (the store's own, where there is one), as
        ``on_store_error`` says; ``run`` (fail open) returns."""
        call, choice = attempt.call, attempt.policy.on_store_error
        if choice == "run":
            return
        if choice == "raise":
            if error is not None:
                raise error
            raise StoreUnavailable(f"the {outcome} of key {call.key} could not be recorded")
        emit(
            Decision.DEFERRED,
            call,
            attempt.task_id,
            delay=STORE_RETRY_DELAY,
            reason=f"{outcome} not recorded",
        )
        raise Deferred(STORE_RETRY_DELAY, f"the idempotency store refused the {outcome}")

    def _completed_late(self, attempt: Attempt, stale: Stale, codec: Codec) -> Any:
        """Another attempt took the key over before this one completed: hand back what it
        recorded, so every handle of the key gives one answer, or ``LeaseLostError``."""
        call = attempt.call
        state = stale.state.value if stale.state else "absent"
        emit(Decision.STALE_COMPLETION, call, attempt.task_id, token=attempt.token, state=state)
        if stale.state is State.DONE:
            return Replay(call, stale.task_id, stale.result).value(codec)
        raise LeaseLostError(call.key)

    def fail(self, attempt: Attempt, exc: BaseException) -> None:
        """Give the key back after the body raised: ``failed`` for terminal exceptions
        (replayed to later deliveries), ``idle`` otherwise (a retry or redelivery runs again)."""
        if not attempt.guarded:
            return
        terminal = isinstance(exc, attempt.policy.terminal_exceptions)
        self._release(attempt, _error_text(exc), terminal=terminal, kind=type(exc).__name__)

    def abandon(self, attempt: Attempt, reason: BaseException) -> None:
        """Give the key back ``idle`` for a body that never ran: why the framework skipped the
        delivery says nothing about the call, whatever ``terminal_exceptions`` lists."""
        if attempt.guarded:
            self._release(attempt, _error_text(reason), terminal=False, kind=type(reason).__name__)

    def _release(
        self, attempt: Attempt, error: str, *, terminal: bool, kind: str | None = None
    ) -> None:
        self.leases.drop(attempt.attempt_id)  # nothing renews a lease being given back
        call, policy = attempt.call, attempt.policy
        answer = self._with_store_retries(
            attempt,
            lambda: self.store.release(
                call.key,
                attempt_id=attempt.attempt_id,
                token=attempt.token,
                error=error,
                terminal=terminal,
                ttl_ms=policy.result_ttl_ms,
            ),
        )
        match answer:
            case None:
                if terminal:  # the key's answer, not recorded (idle: the next run decides)
                    self._unrecorded(attempt, "terminal failure")
            case Stale():
                emit(
                    Decision.STALE_COMPLETION,
                    call,
                    attempt.task_id,
                    token=attempt.token,
                    released=True,
                )
            case Released():
                kind = kind or error.partition(":")[0]
                emit(Decision.RELEASED, call, attempt.task_id, terminal=terminal, error=kind)
            case _:
                assert_never(answer)

    def run(
        self, policy: Policy, call: Call, task_id: str, body: Callable[[], Any], codec: Codec
    ) -> Any:
        """The whole execute guard in one call, for callers that run the body themselves."""
        return self.delivery(policy, call, task_id, codec).run(body)

    def _with_store_retries(self, attempt: Attempt, op: Callable[[], A]) -> A | None:
        """Retry a final write while the lease would still be ours; None if it never landed."""
        deadline = time.monotonic() + attempt.policy.lease
        delay = 0.05
        while True:
            try:
                return op()
            except StoreUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    emit(
                        Decision.STORE_UNAVAILABLE,
                        attempt.call,
                        attempt.task_id,
                        stage="finish",
                        error=str(exc),
                    )
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


class Delivery:
    """One delivery of a guarded call, driven by its adapter.

    ``decide`` takes the execute decision (it may raise ``Deferred``, ``Dropped`` or an
    ``IdempotencyError``); ``run`` replays the stored result, or runs the body under its lease
    and records the value or the exception. An adapter that must decide before it can call
    the body (Dramatiq decides in a middleware hook) calls ``decide`` first and ``run`` later;
    one that has the body at hand calls ``run`` alone. ``release`` gives the key back before
    the body ends (a retry about to be published) and ``abandon`` when the body never ran.
    ``hand_over`` leaves the key held for the message that resumes this attempt.
    """

    __slots__ = (
        "_guard",
        "call",
        "codec",
        "decision",
        "deferrals",
        "error",
        "finished",
        "follows",
        "policy",
        "ran",
        "resumes",
        "task_id",
    )

    def __init__(
        self,
        guard: Guard,
        policy: Policy,
        call: Call,
        task_id: str,
        codec: Codec,
        *,
        follows: str | None = None,
        resumes: tuple[str, int] | None = None,
        deferrals: int = 0,
    ) -> None:
        self._guard = guard
        self.policy = policy
        self.call = call
        self.task_id = task_id
        self.codec = codec
        self.follows = follows
        self.resumes = resumes
        self.deferrals = deferrals
        self.decision: Attempt | Replay | None = None
        self.error: Exception | None = None  # what deciding raised: raised again by run
        self.ran = False  # the body was called
        self.finished = False  # the outcome is recorded (or the key given back)

    @property
    def attempt(self) -> Attempt | None:
        """The attempt this delivery holds, when it decided to run the body."""
        return self.decision if isinstance(self.decision, Attempt) else None

    def decide(self) -> Attempt | Replay:
        """Decided once: later calls give the same answer, or raise the same error."""
        if self.error is not None:
            raise self.error
        if self.decision is None:
            try:
                self.decision = self._decided()
            except Exception as exc:
                self.error = exc
                raise
        return self.decision

    def _decided(self) -> Attempt | Replay:
        if self.resumes is not None:
            attempt_id, token = self.resumes
            resumed = self._guard.resume(self.policy, self.call, self.task_id, attempt_id, token)
            if resumed is not None:
                return resumed
        return self._guard.begin(
            self.policy, self.call, self.task_id, follows=self.follows, deferrals=self.deferrals
        )

    def run(self, body: Callable[[], Any]) -> Any:
        """What the caller gets: the replayed result, or the body's (recorded) value.

        Another attempt took the key over while the body ran (found by a step or by the
        completion): the message is deferred, to get what that attempt records."""
        try:
            return self._run(body)
        except LeaseLostError as exc:
            if not self.ran or exc.key != self.call.key:
                raise  # not this delivery's lease: an error the body passed on
            raise Deferred(self.policy.lease, str(exc)) from exc

    def _run(self, body: Callable[[], Any]) -> Any:
        decision = self.decide()
        if isinstance(decision, Replay):
            return decision.value(self.codec)
        self.ran = True
        with self._guard.holding(decision, self.codec):
            try:
                value = body()
            except (Deferred, Dropped) as exc:
                # A nested delivery set the message aside: a resumed attempt goes with it.
                if self.resumes is None:
                    self.release(exc)
                self.finished = True  # resumed: handed over again, to the message's copy
                raise
            except BaseException as exc:
                if isinstance(exc, StepStoreUnavailable) and exc.key == self.call.key:
                    self.finished = True  # the store is down: there is nothing to give back
                    self._guard._unrecorded(decision, "step", exc)
                self.release(exc)
                raise
        if self.finished:  # given back while the body ran: nothing more to record
            return value
        self.finished = True
        return self._guard.succeed(decision, value, self.codec)

    def release(self, exc: BaseException) -> None:
        """Give the key back now (``idle``, or ``failed`` for a terminal ``exc``), once."""
        attempt = self.attempt
        if attempt is not None and not self.finished:
            self.finished = True
            self._guard.fail(attempt, exc)

    def abandon(self, reason: BaseException) -> None:
        """The body never ran (another middleware skipped or failed the delivery): give the
        key back ``idle``, so a later delivery runs it; nothing is recorded as its answer."""
        attempt = self.attempt
        if attempt is not None and not self.ran and not self.finished:
            self.finished = True
            self._guard.abandon(attempt, reason)

    def hand_over(self) -> None:
        """Record nothing and keep the key held: a message published with this attempt's id
        and token (``Guard.delivery(resumes=...)``) takes the attempt over. Until it does,
        nothing renews the lease, so a message that never comes costs one lease period."""
        self.finished = True


def _fingerprint(policy: Policy, call: Call) -> str:
    return call.fingerprint if policy.validate_payload else ""


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _encode(codec: Codec, value: Any, call: Call, limit: int) -> bytes:
    """The stored form of a result. Raises what the codec raises for a value it cannot
    encode, and ``ResultTooLargeError`` for one over ``limit``."""
    data = codec.encode(value)
    if len(data) > limit:
        logger.warning(
            "idemtask: result of %s (key %s) is %d bytes, over max_result_bytes=%d; not "
            "stored, so the key fails terminally (raise max_result_bytes, or return a "
            "reference to the data instead)",
            call.task_name,
            call.key,
            len(data),
            limit,
        )
        raise ResultTooLargeError(call.key, len(data), limit)
    return data


def _attempt_id() -> str:
    return uuid.uuid4().hex


def busy_delay(tries: int, lease_left: float) -> float:
    """Seconds a copy that found its key busy waits before it asks again: 50 ms after its
    first look, doubling with each look after, never over ``MAX_BUSY_DELAY``, nor past the
    point the holder's lease (``lease_left`` seconds) could have run out, when it may take
    the key over. One schedule for a deferred copy (``tries``: its deferrals so far) and a
    waiting one (its polls so far): the holder's end reaches it within ``MAX_BUSY_DELAY``
    while it asks the store at most ``1 / MAX_BUSY_DELAY`` times a second."""
    step = MIN_BUSY_DELAY * float(2 ** min(max(tries, 0), 16))
    return max(MIN_BUSY_DELAY, min(step, MAX_BUSY_DELAY, lease_left))
