"""``idemtask.step``: named steps of a body, each recorded under the task's key as it ends.

A body that dies between two side effects runs again on the next attempt. Steps make that
rerun skip what already happened: a recorded step hands back its stored value without
running, and only the first unrecorded step runs. Only the attempt that holds the lease
records (attempt id and fencing token checked in the same script), so a stale holder
stops at its next step with ``LeaseLostError``. What can still repeat is one step's own
effect, when the crash falls inside that step: pass ``idemtask.current().fencing_token``
to that effect's system to close it.

Outside a guarded body (a task called directly, ``on_store_error="run"`` with the store
down, a thread the body started) a step simply runs its function.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, ParamSpec, Protocol, TypeVar, overload

from idemtask import context
from idemtask.codecs import Codec
from idemtask.errors import IdempotencyError, LeaseLostError, StepStoreUnavailable
from idemtask.store.base import Held, Recorded, Stale, Store, assert_never

__all__ = ["DuplicateStepError", "Step", "StepLog", "StepRun", "StepValueError", "step"]

P = ParamSpec("P")
T = TypeVar("T")
A = TypeVar("A")

MAX_NAME_LENGTH = 200
_MISSING: Any = object()


class DuplicateStepError(IdempotencyError, ValueError):
    """A body began a step whose name it already used in this attempt."""

    def __init__(self, key: str, name: str) -> None:
        self.key = key
        self.name = name
        super().__init__(key, name)

    def __str__(self) -> str:
        return f"step {self.name!r} already ran in this body (key {self.key}); names are unique"


class StepValueError(IdempotencyError, TypeError):
    """A step's value cannot be recorded (the codec refused it, or it is too large).

    Nothing was recorded: the step's effect happened, and the next attempt runs it again.
    """

    def __init__(self, key: str, name: str, reason: str) -> None:
        self.key = key
        self.name = name
        self.reason = reason
        super().__init__(key, name, reason)

    def __str__(self) -> str:
        return f"the value of step {self.name!r} (key {self.key}) cannot be recorded: {self.reason}"


class Retry(Protocol):
    """Runs one store call again while the attempt's lease lasts; None: it never landed."""

    def __call__(self, op: Callable[[], A], /) -> A | None: ...


class StepLog:
    """The steps of one attempt: what is recorded, and the one way to record more.

    Created by the guard for every guarded attempt; it costs nothing until the body's first
    step. That step reads the recorded steps in one round trip (skipped for token 1: no
    attempt before the first one could have recorded any); later steps are served from
    memory, and each recorded step is one round trip. A store that fails past the lease
    stops the body with ``StepStoreUnavailable`` (the guard keeps its message), or, failing
    open (``on_store_error="run"``), lets the step run unrecorded.
    """

    __slots__ = (
        "_begun",
        "_lock",
        "_recorded",
        "attempt_id",
        "codec",
        "execution",
        "fail_open",
        "key",
        "max_bytes",
        "retry",
        "store",
        "token",
    )

    def __init__(
        self,
        store: Store,
        execution: context.Execution,
        codec: Codec,
        max_bytes: int,
        retry: Retry,
        *,
        fail_open: bool = False,
    ) -> None:
        self.store = store
        self.execution = execution
        self.key = execution.key
        self.attempt_id = execution.attempt_id
        self.token = execution.fencing_token
        self.codec = codec
        self.max_bytes = max_bytes
        self.retry = retry
        self.fail_open = fail_open
        self._recorded: dict[str, bytes] | None = {} if self.token == 1 else None
        self._begun: set[str] = set()
        self._lock = threading.Lock()

    def begin(self, name: str) -> Any:
        """The recorded value of step ``name``, or ``_MISSING`` when the step must run."""
        self._check_held()
        with self._lock:
            if name in self._begun:
                raise DuplicateStepError(self.key, name)
            recorded = self._load()
            self._begun.add(name)
        if name in recorded:
            return self.codec.decode(recorded[name])
        return _MISSING

    def abandon(self, name: str) -> None:
        """The step raised: nothing is recorded, and the body may run it again."""
        with self._lock:
            self._begun.discard(name)

    def record(self, name: str, value: Any) -> Any:
        """Record the step's value; returns it as the codec gives it back on replay."""
        data = self._encode(name, value)
        answer = self.retry(
            lambda: self.store.record_step(
                self.key, attempt_id=self.attempt_id, token=self.token, name=name, value=data
            )
        )
        match answer:
            case None:
                if self.fail_open:  # on_store_error="run": the step goes on unrecorded
                    return self.codec.decode(data)
                self.abandon(name)
                what = f"step {name!r} of key {self.key} could not be recorded"
                raise StepStoreUnavailable(self.key, what)
            case Stale():
                self._lost()
            case Recorded():
                pass
            case _:
                assert_never(answer)
        with self._lock:
            if self._recorded is not None:
                self._recorded[name] = data
        return self.codec.decode(data)

    def _load(self) -> dict[str, bytes]:
        if self._recorded is None:
            answer = self.retry(
                lambda: self.store.recorded_steps(
                    self.key, attempt_id=self.attempt_id, token=self.token
                )
            )
            match answer:
                case None:
                    if self.fail_open:  # as if none were recorded: asked again next step
                        return {}
                    what = f"the steps of key {self.key} could not be read"
                    raise StepStoreUnavailable(self.key, what)
                case Stale():
                    self._lost()
                case Held(steps=steps):
                    self._recorded = dict(steps)
                case _:
                    assert_never(answer)
        return self._recorded

    def _encode(self, name: str, value: Any) -> bytes:
        try:
            data = self.codec.encode(value)
        except Exception as exc:
            self.abandon(name)
            raise StepValueError(self.key, name, f"{type(exc).__name__}: {exc}") from exc
        if len(data) > self.max_bytes:
            self.abandon(name)
            reason = f"{len(data)} bytes, over max_result_bytes={self.max_bytes}"
            raise StepValueError(self.key, name, reason)
        return data

    def _check_held(self) -> None:
        if self.execution.lease_lost:
            raise LeaseLostError(self.key, f"lease on idempotency key {self.key} was lost")

    def _lost(self) -> NoReturn:
        self.execution.mark_lease_lost()
        raise LeaseLostError(
            self.key, f"lease on idempotency key {self.key} was taken over; this body stops"
        )


def _log() -> StepLog | None:
    execution = context.running()
    return None if execution is None else execution.steps


def _run(name: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    log = _log()
    if log is None:
        return fn(*args, **kwargs)
    recorded = log.begin(name)
    if recorded is not _MISSING:
        return recorded  # type: ignore[no-any-return]
    try:
        value = fn(*args, **kwargs)
    except BaseException:
        log.abandon(name)
        raise
    return log.record(name, value)  # type: ignore[no-any-return]


class StepRun:
    """What ``with idemtask.step(name) as s`` gives the block.

    ``s.replayed`` is True when the step was recorded by an earlier attempt: ``s.value``
    holds its value and the block must not repeat the effect. Otherwise the block does the
    work and sets ``s.value``; it is recorded when the block ends without an exception.
    """

    __slots__ = ("_log", "name", "replayed", "value")

    def __init__(self, name: str, log: StepLog | None, recorded: Any) -> None:
        self.name = name
        self._log = log
        self.replayed = recorded is not _MISSING
        self.value: Any = recorded if self.replayed else None


class Step:
    """A named step: a context manager, or a decorator that runs the function as the step."""

    __slots__ = ("_run", "name")

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise ValueError(
                f"a step name is a non-empty string of at most {MAX_NAME_LENGTH} characters, "
                f"not {name!r}"
            )
        self.name = name
        self._run: StepRun | None = None

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(fn)
        def as_step(*args: P.args, **kwargs: P.kwargs) -> T:
            return _run(self.name, fn, *args, **kwargs)

        return as_step

    def __enter__(self) -> StepRun:
        if self._run is not None:
            raise RuntimeError(f"step {self.name!r} is already entered")
        log = _log()
        recorded = _MISSING if log is None else log.begin(self.name)
        self._run = StepRun(self.name, log, recorded)
        return self._run

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run, self._run = self._run, None
        if run is None or run._log is None or run.replayed:
            return
        if kind is not None:
            run._log.abandon(self.name)
            return
        run.value = run._log.record(self.name, run.value)


@overload
def step(name: str, /) -> Step: ...


@overload
def step(name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...


def step(name: str, fn: Callable[..., Any] | None = None, /, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` as the body's step ``name`` and return its value, or,
    without ``fn``, a ``Step`` to use as ``with idemtask.step(name) as s:`` or as a
    decorator.

    Inside a guarded body, a step recorded by an earlier attempt of the key returns its
    stored value without running; otherwise it runs and its value is recorded (with the
    task's result codec) before the step returns. Names are unique within a body.
    """
    declared = Step(name)
    if fn is None:
        return declared
    return _run(declared.name, fn, *args, **kwargs)
