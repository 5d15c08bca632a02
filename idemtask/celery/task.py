"""``IdempotentTask``: the Celery side of the guard.

Enqueue (``apply_async``) derives the key once, carries it in the message headers and asks
the guard whether to publish. Execute (``__call__``) is the real guarantee: every delivery,
whoever published it, asks the guard whether to run the body, replay the stored result,
defer the message or drop it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

from celery import Task, states
from celery.exceptions import Ignore, Reject, Retry
from celery.result import AsyncResult, EagerResult
from kombu.utils.uuid import uuid

from idemtask.celery.config import app_settings, codec_for, task_policy
from idemtask.celery.django import OnCommit
from idemtask.errors import (
    AlreadyRunningError,
    ConfigurationError,
    KeyDerivationError,
    LeaseLostError,
    TaskFailedError,
)
from idemtask.guard import Attempt, Call, Deferred, Dropped, Existing, Guard, Replay
from idemtask.keys import DerivedKey, bind_arguments, derive_key, explicit_key
from idemtask.policy import Policy
from idemtask.runtime import guard_for
from idemtask.store.base import State

logger = logging.getLogger("idemtask.celery")

#: Message headers that carry the key computed at enqueue, so the worker does not recompute
#: it from arguments that went through the serializer (and survives retries and defers).
KEY_HEADER = "idemtask_key"
FINGERPRINT_HEADER = "idemtask_fingerprint"
#: The per-call option of ``apply_async``; popped before Celery sees the options.
KEY_OPTION = "idempotency_key"

#: Options that make a publish part of a canvas (or a callback sent by a worker). Their task
#: ids are frozen in advance and something waits on each of them, so they are never
#: suppressed at enqueue: the execute guard replays the stored result under their own id.
_CANVAS_OPTIONS = ("chord", "group_id", "group_index", "chain", "parent_id")
_PRESENT_OPTIONS = ("chain",)  # a chain step sent with ``chain=[]`` is still a chain step


@dataclasses.dataclass(slots=True)
class _Running:
    """A body this context is running, so a retry can give its key back before the retry
    message is published (else the retry could be delivered while the key is still held)."""

    attempt: Attempt
    guard: Guard
    request: Any
    released: bool = False

    def release(self, exc: BaseException) -> None:
        if not self.released:
            self.released = True
            self.guard.leases.drop(self.attempt.attempt_id)
            self.guard.fail(self.attempt, exc)


_running: contextvars.ContextVar[tuple[_Running, ...]] = contextvars.ContextVar(
    "idemtask_celery_running", default=()
)


class IdempotentTask(OnCommit, Task):  # type: ignore[misc]
    """A Celery task that runs its body at most once per idempotency key.

    Use per task (``@app.task(base=IdempotentTask, lease=30)``) or for a whole app
    (``Celery(..., task_cls=IdempotentTask)``). Every option of
    ``POLICY_OPTIONS`` may be given as a decorator keyword; defaults come
    from ``app.conf.idemtask``. ``idempotent=False`` makes it a plain Task.
    """

    # -- configuration --------------------------------------------------------------------

    def idemtask_policy(self) -> Policy | None:
        """The resolved policy (None when not guarded); raises ConfigurationError."""
        return task_policy(self)

    def idemtask_key(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> DerivedKey:
        """The key a call with these arguments gets (raises KeyDerivationError)."""
        policy = self.idemtask_policy()
        if policy is None:
            raise ConfigurationError(f"task {self.name} is not idempotent")
        return self._derive(policy, args, kwargs, idempotency_key)

    def _derive(
        self,
        policy: Policy,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        explicit: str | None,
    ) -> DerivedKey:
        call_args = tuple(args or ())
        call_kwargs = dict(kwargs or {})
        arguments = bind_arguments(self.run, call_args, call_kwargs, task_name=self.name)
        version = policy.idempotency_key_version
        if explicit is not None:
            # Without payload validation the arguments need not be encodable at all.
            checked = arguments if policy.validate_payload else None
            return explicit_key(self.name, explicit, version=version, arguments=checked)
        return derive_key(
            self.name,
            arguments,
            spec=policy.idempotency_key,
            version=version,
            args=call_args,
            kwargs=call_kwargs,
        )

    def _guard(self) -> Guard:
        return guard_for(app_settings(self.app))

    # -- enqueue --------------------------------------------------------------------------

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Publish unless a call with the same key is already enqueued, running or done.

        Extra option: ``idempotency_key="..."`` keys this call by the given string.
        """
        explicit = options.pop(KEY_OPTION, None)
        policy = self.idemtask_policy()
        if policy is None:
            if explicit is not None:
                raise ConfigurationError(
                    f"idempotency_key given to apply_async of {self.name}, which is not idempotent"
                )
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        resubmit = task_id is not None and task_id == self.request.id
        if resubmit and int(options.get("retries") or 0) > int(self.request.retries or 0):
            _release_current(task_id, Retry("retry requested"))
        passthrough = resubmit or _passes_through(link, link_error, options)
        headers = dict(options.pop("headers", None) or {})

        def publish() -> Any:
            return super(IdempotentTask, self).apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow,
                headers=headers, **options,
            )  # fmt: skip

        try:
            call = self._enqueue_call(policy, args, kwargs, headers, explicit)
        except KeyDerivationError:
            if not passthrough or explicit is not None:
                raise  # nothing is published
            # A canvas step sent by a worker (its arguments include the previous result):
            # refusing it here would break the workflow silently; the execute side raises
            # the same error as this task's failure, where errbacks see it.
            return publish()
        headers[KEY_HEADER] = call.key
        headers[FINGERPRINT_HEADER] = call.fingerprint
        fixed_id = task_id is not None
        task_id = task_id or uuid()
        guard = self._guard()
        if not passthrough:
            existing = guard.reserve(policy, call, task_id, delay=_delay(options))
            if existing is not None:
                if not fixed_id:
                    return self._existing(existing, call)
                # The caller fixed the id in advance (a frozen signature, e.g. a chord body)
                # and waits on that id: publish, and the execute guard replays under it.
                passthrough = True
        try:
            return publish()
        except BaseException:
            if not passthrough:
                guard.cancel(call, task_id)
            raise

    def _enqueue_call(
        self,
        policy: Policy,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        headers: Mapping[str, Any],
        explicit: str | None,
    ) -> Call:
        """The key already in the headers (a retry or re-publish keeps it), else derived."""
        if explicit is None and headers.get(KEY_HEADER):
            return Call(self.name, headers[KEY_HEADER], headers.get(FINGERPRINT_HEADER) or "")
        derived = self._derive(policy, args, kwargs, explicit)
        return Call(self.name, derived.key, derived.fingerprint)

    def _existing(self, existing: Existing, call: Call) -> AsyncResult | EagerResult:
        """A handle to the original task. Eager apps get an EagerResult with the stored value,
        since eager mode normally leaves the result backend unused."""
        if not self.app.conf.task_always_eager:
            return self.AsyncResult(existing.task_id)
        if existing.state is State.DONE:
            value = None
            if existing.result is not None:
                value = codec_for(self.app).decode(existing.result.data)
            return EagerResult(existing.task_id, value, states.SUCCESS, name=self.name)
        if existing.state is State.FAILED:
            error = TaskFailedError(call.key, existing.task_id, "failed terminally")
            return EagerResult(existing.task_id, error, states.FAILURE, name=self.name)
        return EagerResult(existing.task_id, None, states.PENDING, name=self.name)

    # -- execute --------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Guard one delivery; direct calls (``task(...)``) run the body unguarded."""
        policy = self.idemtask_policy()
        request = self.request
        if policy is None or request.called_directly or _is_recursive_call(request):
            return super().__call__(*args, **kwargs)
        call = self._call_for(policy, request, args, kwargs)
        guard = self._guard()
        codec = codec_for(self.app)
        eager = bool(request.is_eager)
        if eager:
            # An eager retry runs inside the failed attempt's own body: give its key back.
            _release_current(request.id, Retry("eager retry"))
            policy = _eager_policy(policy)
        try:
            decided = guard.begin(policy, call, task_id=request.id)
        except Deferred as deferred:
            if eager:
                raise AlreadyRunningError(call.key, "", deferred.delay) from None
            self._defer(args, kwargs, deferred.delay, deferred.reason)
        except Dropped as dropped:
            raise Ignore(str(dropped)) from None
        if isinstance(decided, Replay):
            return decided.value(codec)
        running = _Running(decided, guard, request)
        token = _running.set((*_running.get(), running))
        try:
            with guard.holding(decided, codec):
                try:
                    # The tracer already pushed this request; Task.__call__ would push a
                    # second, "called directly" one and hide request.id from the body.
                    value = self.run(*args, **kwargs)
                except BaseException as exc:
                    running.release(exc)
                    raise
        finally:
            _running.reset(token)
        try:
            return guard.succeed(decided, value, codec)
        except LeaseLostError as exc:
            if eager:
                raise
            # Another attempt took the key over: deliver its recorded result later.
            self._defer(args, kwargs, policy.lease, str(exc))

    def _call_for(
        self, policy: Policy, request: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Call:
        """The key from the message header, or derived again for messages without one
        (``send_task`` by name, beat in another process, another language's producer)."""
        headers = request.headers or {}
        key = headers.get(KEY_HEADER) or request.get(KEY_HEADER)
        if key:
            fingerprint = headers.get(FINGERPRINT_HEADER) or request.get(FINGERPRINT_HEADER)
            return Call(self.name, str(key), str(fingerprint or ""))
        derived = self._derive(policy, args, kwargs, None)
        return Call(self.name, derived.key, derived.fingerprint)

    def _defer(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], delay: float, reason: str
    ) -> NoReturn:
        """Publish this same message again (same id, headers and ``retries``, so the user's
        retry budget is untouched) after ``delay`` seconds, then ack this copy unrecorded.

        If that publish fails the message is rejected with requeue, so it is never lost.
        """
        request = self.request
        try:
            signature = self.signature_from_request(
                request, tuple(args), dict(kwargs), countdown=delay
            )
            signature.apply_async()
        except Exception as exc:
            logger.warning(
                "idemtask: could not re-publish deferred task %s[%s] (%s); requeueing it",
                self.name,
                request.id,
                exc,
            )
            raise Reject(f"deferral failed: {exc}", requeue=True) from exc
        logger.info(
            "idemtask: task %s[%s] deferred %.2fs: %s", self.name, request.id, delay, reason
        )
        raise Ignore(f"deferred: {reason}")


def _passes_through(link: Any, link_error: Any, options: Mapping[str, Any]) -> bool:
    """Canvas members, callbacks, retries and replacements are never suppressed at enqueue."""
    if link or link_error:
        return True
    if any(options.get(name) is not None for name in _CANVAS_OPTIONS):
        return True
    if any(name in options for name in _PRESENT_OPTIONS):
        return True
    return bool(options.get("replaced_task_nesting")) or int(options.get("retries") or 0) > 0


def _delay(options: Mapping[str, Any]) -> float:
    """Seconds a ``countdown`` or ``eta`` holds the message back: its reservation lasts longer."""
    countdown = options.get("countdown")
    if countdown:
        return max(0.0, float(countdown))
    eta = options.get("eta")
    if isinstance(eta, datetime):
        return max(0.0, (eta - datetime.now(eta.tzinfo)).total_seconds())
    return 0.0


def _is_recursive_call(request: Any) -> bool:
    """A body that calls its own task directly still sees its own request on top."""
    return any(running.request is request for running in _running.get())


def _release_current(task_id: str | None, exc: BaseException) -> None:
    for running in _running.get():
        if running.attempt.task_id == task_id:
            running.release(exc)


def _eager_policy(policy: Policy) -> Policy:
    """Eager mode has no broker to defer to: wait (bounded by ``wait_timeout``) instead, and
    let a store error surface."""
    return dataclasses.replace(
        policy,
        on_running="wait" if policy.on_running == "defer" else policy.on_running,
        on_store_error="raise" if policy.on_store_error == "defer" else policy.on_store_error,
    )
