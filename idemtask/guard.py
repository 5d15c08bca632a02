"""The framework-neutral engine: what to do at enqueue, at execute start, and at the end.

Adapters translate framework events into these calls and the answers back into framework
actions (publish or hand back a handle; run, replay, defer or drop; record the outcome).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from idemtask import context
from idemtask.codecs import Codec
from idemtask.errors import (
    AlreadyRunningError,
    DuplicateTaskError,
    IdempotencyConflict,
    LeaseLostError,
    PoisonMessageError,
    StoreUnavailable,
    TaskFailedError,
)
from idemtask.events import Decision, emit
from idemtask.lease import LeaseKeeper
from idemtask.policy import Policy
from idemtask.store.base import Lease, Outcome, State, Status, Store, StoredResult

logger = logging.getLogger("idemtask")

STORE_RETRY_DELAY = 5.0  # seconds a message waits when the store cannot be reached
MIN_DEFER_DELAY = 0.25
# A busy copy comes back at the latest when the holder's lease could have run out, but no
# later than this: a holder that finishes early should not keep its duplicates waiting long.
MAX_DEFER_DELAY = 10.0


@dataclass(frozen=True, slots=True)
class Call:
    """One task invocation, as the store knows it."""

    task_name: str
    key: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Existing:
    """A duplicate enqueue's answer: the original task id, and its result when done."""

    task_id: str
    state: State | None
    result: StoredResult | None


class Deferred(Exception):
    """Put this message back on the broker to be delivered again after ``delay`` seconds."""

    def __init__(self, delay: float, reason: str) -> None:
        self.delay = delay
        self.reason = reason
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
        if self.result is None:
            logger.warning(
                "idemtask: task %s key %s completed without a stored result; replaying None",
                self.call.task_name,
                self.call.key,
            )
            return None
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
            outcome = self.store.reserve(
                call.key,
                task_id=task_id,
                task_name=call.task_name,
                fingerprint=call.fingerprint if policy.validate_payload else "",
                reservation_ms=policy.reservation_ms + max(0, int(delay * 1000)),
                ttl_ms=policy.result_ttl_ms,
            )
        except StoreUnavailable as exc:
            emit(Decision.STORE_UNAVAILABLE, call.task_name, call.key, task_id, stage="enqueue")
            if policy.on_store_error == "raise":
                raise
            # The execute guard still protects the message; publishing loses nothing.
            logger.debug("idemtask enqueue without reservation: %s", exc)
            return None
        took = time.perf_counter() - started
        if outcome.status is Status.NEW:
            emit(Decision.NEW, call.task_name, call.key, task_id, duration=took)
            return None
        if outcome.status is Status.CONFLICT:
            emit(Decision.CONFLICT, call.task_name, call.key, task_id, existing=outcome.task_id)
            raise IdempotencyConflict(call.key, outcome.task_id)
        state = outcome.state.value if outcome.state else "unknown"
        emit(
            Decision.DUPLICATE,
            call.task_name,
            call.key,
            task_id,
            duration=took,
            existing=outcome.task_id,
            state=state,
            policy=policy.on_duplicate,
        )
        if policy.on_duplicate == "raise":
            raise DuplicateTaskError(call.key, outcome.task_id, state)
        if policy.on_duplicate == "enqueue":
            return None
        return Existing(outcome.task_id, outcome.state, outcome.result)

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

    # -- execute -------------------------------------------------------------------------

    def begin(self, policy: Policy, call: Call, task_id: str) -> Attempt | Replay:
        """Decide one delivery: an ``Attempt`` to run, or a ``Replay``.

        Raises ``Deferred`` / ``Dropped`` for the adapter to act on, and
        AlreadyRunningError, TaskFailedError, IdempotencyConflict or StoreUnavailable.
        """
        deadline = time.monotonic() + policy.wait_timeout
        while True:
            acquired = self._acquire(policy, call, task_id)
            if acquired is None:  # store down, on_store_error="run"
                return Attempt(call, policy, task_id, _attempt_id(), 0, False, guarded=False)
            outcome, attempt_id, took = acquired
            if outcome.status is not Status.BUSY:
                return self._decided(policy, call, task_id, outcome, attempt_id, took)
            left = max(outcome.lease_left_ms / 1000.0, MIN_DEFER_DELAY)
            emit(
                Decision.BUSY,
                call.task_name,
                call.key,
                task_id,
                holder=outcome.task_id,
                lease_left_ms=outcome.lease_left_ms,
                policy=policy.on_running,
            )
            if policy.on_running == "raise":
                raise AlreadyRunningError(call.key, outcome.task_id, left)
            if policy.on_running == "drop":
                emit(Decision.DROPPED, call.task_name, call.key, task_id, holder=outcome.task_id)
                raise Dropped(f"{call.key} is running as {outcome.task_id}")
            remaining = deadline - time.monotonic()
            if policy.on_running == "wait" and remaining > 0:
                time.sleep(min(left, remaining, _poll_interval(policy)))
                continue
            delay = min(left, policy.lease, MAX_DEFER_DELAY)
            emit(Decision.DEFERRED, call.task_name, call.key, task_id, delay=round(delay, 3))
            raise Deferred(delay, f"{call.key} is running as {outcome.task_id}")

    def _acquire(
        self, policy: Policy, call: Call, task_id: str
    ) -> tuple[Outcome, str, float] | None:
        attempt_id = _attempt_id()
        started = time.perf_counter()
        try:
            outcome = self.store.acquire(
                call.key,
                task_id=task_id,
                attempt_id=attempt_id,
                task_name=call.task_name,
                fingerprint=call.fingerprint if policy.validate_payload else "",
                lease_ms=policy.lease_ms,
                max_deliveries=policy.max_deliveries,
                ttl_ms=policy.result_ttl_ms,
            )
        except StoreUnavailable:
            emit(
                Decision.STORE_UNAVAILABLE,
                call.task_name,
                call.key,
                task_id,
                stage="execute",
                policy=policy.on_store_error,
            )
            if policy.on_store_error == "run":
                return None
            if policy.on_store_error == "defer":
                emit(
                    Decision.DEFERRED,
                    call.task_name,
                    call.key,
                    task_id,
                    delay=STORE_RETRY_DELAY,
                    reason="store unavailable",
                )
                raise Deferred(STORE_RETRY_DELAY, "the idempotency store is unreachable") from None
            raise
        return outcome, attempt_id, time.perf_counter() - started

    def _decided(
        self,
        policy: Policy,
        call: Call,
        task_id: str,
        outcome: Outcome,
        attempt_id: str,
        took: float,
    ) -> Attempt | Replay:
        status = outcome.status
        if status is Status.ACQUIRED:
            decision = Decision.TAKEOVER if outcome.takeover else Decision.ACQUIRED
            emit(
                decision,
                call.task_name,
                call.key,
                task_id,
                duration=took,
                token=outcome.token,
                deliveries=outcome.deliveries,
            )
            return Attempt(call, policy, task_id, attempt_id, outcome.token, outcome.takeover)
        if status is Status.DONE:
            emit(
                Decision.REPLAYED,
                call.task_name,
                call.key,
                task_id,
                duration=took,
                original=outcome.task_id,
            )
            return Replay(call, outcome.task_id, outcome.result)
        if status is Status.CONFLICT:
            emit(Decision.CONFLICT, call.task_name, call.key, task_id, existing=outcome.task_id)
            raise IdempotencyConflict(call.key, outcome.task_id)
        if status is Status.POISONED:
            emit(Decision.POISON, call.task_name, call.key, task_id, deliveries=outcome.deliveries)
            raise PoisonMessageError(call.key, outcome.task_id, outcome.error)
        if status is Status.FAILED:
            emit(Decision.FAILED, call.task_name, call.key, task_id, original=outcome.task_id)
            raise TaskFailedError(call.key, outcome.task_id, outcome.error)
        raise AssertionError(f"unexpected acquire outcome {outcome}")  # pragma: no cover

    @contextlib.contextmanager
    def holding(self, attempt: Attempt) -> Iterator[context.Execution]:
        """Run the body inside this: renews the lease and sets ``idemtask.current()``."""
        if attempt.guarded:
            lease = Lease(
                attempt.call.key, attempt.attempt_id, attempt.token, attempt.policy.lease_ms
            )
            self.leases.hold(lease, lambda: self._lost(attempt))
        token = context.activate(attempt.execution)
        try:
            yield attempt.execution
        finally:
            context.deactivate(token)
            if attempt.guarded:
                self.leases.drop(attempt.attempt_id)

    def _lost(self, attempt: Attempt) -> None:
        attempt.execution.mark_lease_lost()
        call = attempt.call
        emit(Decision.LEASE_LOST, call.task_name, call.key, attempt.task_id, token=attempt.token)

    def succeed(self, attempt: Attempt, value: Any, codec: Codec) -> Any:
        """Record the body's value; returns what the caller should see (its own value, or the
        value recorded by the attempt that took the key over)."""
        if not attempt.guarded:
            return value
        call, policy = attempt.call, attempt.policy
        data = _encode(codec, value, call, policy.max_result_bytes)
        outcome = self._with_store_retries(
            attempt,
            lambda: self.store.complete(
                call.key,
                attempt_id=attempt.attempt_id,
                token=attempt.token,
                result=data,
                result_ttl_ms=policy.result_ttl_ms,
            ),
        )
        if outcome is None or outcome.status is Status.COMPLETED:
            if outcome is not None:
                emit(
                    Decision.COMPLETED,
                    call.task_name,
                    call.key,
                    attempt.task_id,
                    token=attempt.token,
                )
            return value
        emit(
            Decision.STALE_COMPLETION,
            call.task_name,
            call.key,
            attempt.task_id,
            token=attempt.token,
            state=outcome.state.value if outcome.state else "absent",
        )
        if outcome.state is State.DONE:
            return Replay(call, outcome.task_id, outcome.result).value(codec)
        raise LeaseLostError(call.key)

    def fail(self, attempt: Attempt, exc: BaseException) -> None:
        """Give the key back after the body raised: ``failed`` for terminal exceptions
        (replayed to later deliveries), ``idle`` otherwise (a retry or redelivery runs again)."""
        if not attempt.guarded:
            return
        call, policy = attempt.call, attempt.policy
        terminal = isinstance(exc, policy.terminal_exceptions)
        outcome = self._with_store_retries(
            attempt,
            lambda: self.store.release(
                call.key,
                attempt_id=attempt.attempt_id,
                token=attempt.token,
                error=f"{type(exc).__name__}: {exc}"[:2000],
                terminal=terminal,
                ttl_ms=policy.result_ttl_ms,
            ),
        )
        if outcome is not None and outcome.status is Status.STALE:
            emit(
                Decision.STALE_COMPLETION,
                call.task_name,
                call.key,
                attempt.task_id,
                token=attempt.token,
                released=True,
            )
        elif outcome is not None:
            emit(
                Decision.RELEASED,
                call.task_name,
                call.key,
                attempt.task_id,
                terminal=terminal,
                error=type(exc).__name__,
            )

    def run(
        self, policy: Policy, call: Call, task_id: str, body: Callable[[], Any], codec: Codec
    ) -> Any:
        """Begin, run the body under its lease, and record the outcome: the whole execute
        guard for adapters that call the body themselves."""
        decided = self.begin(policy, call, task_id)
        if isinstance(decided, Replay):
            return decided.value(codec)
        with self.holding(decided):
            try:
                value = body()
            except BaseException as exc:
                self.fail(decided, exc)
                raise
        return self.succeed(decided, value, codec)

    def _with_store_retries(self, attempt: Attempt, op: Callable[[], Outcome]) -> Outcome | None:
        """Retry a final write while the lease would still be ours; None if it never landed."""
        deadline = time.monotonic() + attempt.policy.lease
        delay = 0.05
        while True:
            try:
                return op()
            except StoreUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    call = attempt.call
                    emit(
                        Decision.STORE_UNAVAILABLE,
                        call.task_name,
                        call.key,
                        attempt.task_id,
                        stage="finish",
                        error=str(exc),
                    )
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


def _encode(codec: Codec, value: Any, call: Call, limit: int) -> bytes | None:
    try:
        data = codec.encode(value)
    except Exception as exc:
        logger.warning(
            "idemtask: result of %s (key %s) cannot be encoded (%s); recorded as done "
            "without a stored result",
            call.task_name,
            call.key,
            exc,
        )
        return None
    if len(data) > limit:
        logger.warning(
            "idemtask: result of %s (key %s) is %d bytes, over max_result_bytes=%d; recorded "
            "as done without a stored result",
            call.task_name,
            call.key,
            len(data),
            limit,
        )
        return None
    return data


def _attempt_id() -> str:
    return uuid.uuid4().hex


def _poll_interval(policy: Policy) -> float:
    return max(0.05, min(1.0, policy.lease / 20))
