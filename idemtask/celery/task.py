"""``IdempotentTask``: the Celery side of the guard.

Enqueue (``apply_async``) keys the call once (``Identity``), carries the key in the message
headers bound to this task and message, and publishes inside ``Guard.publishing``. Execute
(``__call__``) drives one ``Delivery`` per message: run the body under its lease, replay the
stored result, defer the message or drop it. This module only translates between Celery's
events and those core calls.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

from celery import Task, states
from celery.canvas import Signature
from celery.exceptions import Ignore, Reject, Retry
from celery.result import AsyncResult, EagerResult
from kombu import serialization
from kombu.utils.uuid import uuid

from idemtask.celery.config import app_settings, codec_for, task_identity, task_policy
from idemtask.errors import (
    AlreadyRunningError,
    ConfigurationError,
    KeyDerivationError,
    LeaseLostError,
    TaskFailedError,
)
from idemtask.guard import Call, Deferred, Delivery, Dropped, Existing, Guard
from idemtask.identity import FINGERPRINT_FIELD, KEY_FIELD, Identity, carry
from idemtask.keys import DerivedKey
from idemtask.policy import Policy
from idemtask.runtime import guard_for
from idemtask.store.base import State

logger = logging.getLogger("idemtask.celery")

#: Message headers that carry the key computed at enqueue (see ``idemtask.identity``).
KEY_HEADER = KEY_FIELD
FINGERPRINT_HEADER = FINGERPRINT_FIELD
#: A retry's header: the attempt that published it, which may still be running its body.
FOLLOWS_HEADER = "idemtask_follows"
#: A replacement's header: the replaced call and the attempt it hands over,
#: ``[task name, key, fingerprint, attempt id, token, message id]``.
RESUMES_HEADER = "idemtask_resumes"
#: The per-call option of ``apply_async``; popped before Celery sees the options.
KEY_OPTION = "idempotency_key"

#: Options that make a publish part of a canvas (or a callback sent by a worker). Their task
#: ids are frozen in advance and something waits on each of them, so they are never
#: suppressed at enqueue: the execute guard replays the stored result under their own id.
_CANVAS_OPTIONS = ("chord", "group_id", "group_index", "chain", "parent_id")
_PRESENT_OPTIONS = ("chain",)  # a chain step sent with ``chain=[]`` is still a chain step
_dumps: Callable[..., Any] = serialization.dumps


@dataclasses.dataclass(slots=True)
class _Entered:
    """A request this context entered ``__call__`` for, and the delivery guarding it."""

    request: Any
    delivery: Delivery | None = None


_entered: contextvars.ContextVar[tuple[_Entered, ...]] = contextvars.ContextVar(
    "idemtask_celery_entered", default=()
)


class IdempotentTask(Task):  # type: ignore[misc]
    """A Celery task that runs its body at most once per idempotency key.

    Use per task (``@app.task(base=IdempotentTask, lease=30)``) or for a whole app
    (``Celery(..., task_cls=IdempotentTask)``). Every option of
    ``POLICY_OPTIONS`` may be given as a decorator keyword; defaults come
    from ``app.conf.idemtask``. ``idempotent=False`` makes it a plain Task.
    """

    # -- configuration --------------------------------------------------------------------

    def idemtask_identity(self) -> Identity | None:
        """How this task's calls are keyed (None when not guarded); raises ConfigurationError."""
        return task_identity(self)

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
        identity = self.idemtask_identity()
        if identity is None:
            raise ConfigurationError(f"task {self.name} is not idempotent")
        call = identity.call(args, kwargs, explicit=idempotency_key)
        return DerivedKey(key=call.key, fingerprint=call.fingerprint)

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
        identity = self.idemtask_identity()
        if identity is None:
            if explicit is not None:
                raise ConfigurationError(
                    f"idempotency_key given to apply_async of {self.name}, which is not idempotent"
                )
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        given = options.pop("headers", None)
        headers = _own_headers(given, eager=bool(self.app.conf.task_always_eager))
        message_id = task_id or uuid()
        resubmit = message_id == self.request.id
        passthrough = resubmit or _passes_through(link, link_error, options)
        serializer = options.get("serializer")

        def publish() -> Any:
            return super(IdempotentTask, self).apply_async(
                args, kwargs, message_id, producer, link, link_error, shadow,
                headers=given if headers is None else headers, **options,
            )  # fmt: skip

        try:
            call = self._enqueue_call(identity, headers, message_id, args, kwargs, explicit)
        except Exception as exc:
            self._refuse_as_celery(message_id, args, kwargs, serializer, exc)
            if not isinstance(exc, KeyDerivationError) or not passthrough or explicit is not None:
                raise  # nothing is published
            # A canvas step sent by a worker (its arguments include the previous result):
            # refusing it here would break the workflow silently; the execute side raises
            # the same error as this task's failure, where errbacks see it.
            return publish()
        if headers is not None:
            carry(call, message_id, headers)
            if resubmit and int(options.get("retries") or 0) > int(self.request.retries or 0):
                _follow(message_id, headers)
        guard, reserve, delay = self._guard(), not passthrough, _delay(options)
        with guard.publishing(
            identity.policy, call, message_id, delay=delay, reserve=reserve
        ) as found:
            if found is None:
                return publish()
        if task_id is None:  # a duplicate: Celery never sees it, so ask Celery's checks here
            self._refuse_as_celery(message_id, args, kwargs, serializer, None)
            return self._existing(found, call)
        # The caller fixed the id in advance (a frozen signature, e.g. a chord body) and
        # waits on that id: publish, and the execute guard replays under it.
        return publish()

    def _enqueue_call(
        self,
        identity: Identity,
        headers: Mapping[str, Any] | None,
        message_id: str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        explicit: str | None,
    ) -> Call:
        """The key these headers carry for this message (a retry or re-publish keeps it),
        else derived from the arguments."""
        carried = identity.carried(headers, message_id) if explicit is None else None
        return carried or identity.call(args, kwargs, explicit=explicit)

    def _refuse_as_celery(
        self,
        message_id: str,
        args: Any,
        kwargs: Any,
        serializer: str | None,
        cause: BaseException | None,
    ) -> None:
        """Raise the error Celery raises before publishing this call, if any: its argument
        check (``typing``), the shapes ``send_task`` requires, the serializer. Asked whenever
        idemtask does not hand the call to Celery, so it fails exactly as on a plain task."""
        serializer = serializer or self.serializer
        try:
            if self.typing:
                self.__header__(*(args or ()), **(kwargs or {}))
            dump = self._dump_pydantic_arguments
            if dump is not None and serializer != "pickle":
                args, kwargs = dump(args, kwargs)
            if not self.app.conf.task_always_eager:  # eager Celery fails such a call later
                self.app.amqp.as_task_v2(message_id, self.name, args, kwargs)
            _dumps((args or (), kwargs or {}, {}), serializer)
        except Exception as refusal:
            raise refusal from cause

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
        """Guard one delivery. Direct calls (``task(...)``, and a body calling its own task)
        run as on a plain Task; so does every call of a task that is not guarded."""
        request = self.request
        if request.called_directly or any(e.request is request for e in _entered.get()):
            return super().__call__(*args, **kwargs)
        entry = _Entered(request)
        token = _entered.set((*_entered.get(), entry))
        try:
            identity = self.idemtask_identity()
            if identity is None:
                # The tracer already pushed this request; Task.__call__ would push a second
                # one, which a plain task (whose ``run`` the tracer calls) never sees.
                return self.run(*args, **kwargs)
            return self._deliver(identity, entry, args, kwargs)
        finally:
            _entered.reset(token)

    def _deliver(
        self, identity: Identity, entry: _Entered, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        request = self.request
        eager = bool(request.is_eager)
        policy = _eager_policy(identity.policy) if eager else identity.policy
        headers = request.headers if isinstance(request.headers, Mapping) else {}
        call = identity.resolve(headers, request.id, args, kwargs)
        guard, codec = self._guard(), codec_for(self.app)
        if eager:
            _release_predecessor(request)
        follows = headers.get(FOLLOWS_HEADER)
        delivery = guard.delivery(
            policy, call, request.id, codec, follows=follows if isinstance(follows, str) else None
        )
        entry.delivery = delivery
        finished: list[bool] = []

        def body() -> Any:
            value = self.run(*args, **kwargs)
            if isinstance(value, Retry):  # ``return self.retry(throw=False)``: not an answer
                delivery.release(value)
            finished.append(True)
            return value

        replaced = None if eager else self._replaced(headers, request, guard, codec, call)
        try:
            if replaced is None:
                return delivery.run(body)
            return replaced.run(lambda: _handing_over(replaced, lambda: delivery.run(body)))
        except Deferred as deferred:
            if eager:
                raise AlreadyRunningError(call.key, "", deferred.delay) from None
            self._defer(args, kwargs, deferred.delay, deferred.reason)
        except Dropped as dropped:
            raise Ignore(str(dropped)) from None
        except LeaseLostError as exc:
            if eager or not finished:
                raise
            # Another attempt took the key over: deliver its recorded result later.
            self._defer(args, kwargs, policy.lease, str(exc))

    def on_replace(self, sig: Any) -> Any:
        """Hand this attempt's key to the replacement (same task id), which records its result
        under the replaced call too: a duplicate of that call gets the replacement's answer.

        Only a single idempotent task can take the key; anything else gets it back idle."""
        entry = next((e for e in _entered.get() if e.request is self.request), None)
        delivery = entry.delivery if entry is not None else None
        attempt = delivery.attempt if delivery is not None else None
        target = self.app.tasks.get(getattr(sig, "task", None) or "")
        if (
            attempt is None
            or self.request.is_eager
            or type(sig) is not Signature
            or not isinstance(target, IdempotentTask)
            or target.idemtask_identity() is None
        ):
            return super().on_replace(sig)
        assert delivery is not None
        call = attempt.call
        headers = dict(sig.options.get("headers") or {})
        headers[RESUMES_HEADER] = [
            call.task_name, call.key, call.fingerprint, attempt.attempt_id, attempt.token,
            self.request.id,
        ]  # fmt: skip
        sig.set(headers=headers)
        try:
            return super().on_replace(sig)
        except Ignore:  # published: the replacement resumes the attempt
            delivery.hand_over()
            raise

    def _replaced(
        self, headers: Mapping[str, Any], request: Any, guard: Guard, codec: Any, own: Call
    ) -> Delivery | None:
        """The replaced call's delivery, resuming the attempt it handed to this message."""
        resumes = headers.get(RESUMES_HEADER)
        if not isinstance(resumes, (list, tuple)) or len(resumes) != 6:
            return None
        name, key, fingerprint, attempt_id, token, message_id = resumes
        replaced = self.app.tasks.get(name)
        if message_id != request.id or not isinstance(replaced, IdempotentTask):
            return None
        identity = replaced.idemtask_identity()
        if identity is None:
            return None
        call = Call(name, str(key), str(fingerprint))
        resumed = guard.delivery(
            identity.policy, call, request.id, codec, resumes=(str(attempt_id), int(token))
        )
        return None if call.key == own.key else resumed

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


def _handing_over(resumed: Delivery, inner: Callable[[], Any]) -> Any:
    """Run the replacement's own delivery; if it is set aside (deferred, dropped), the
    replaced call's attempt goes with the message instead of being given back."""
    try:
        return inner()
    except (Deferred, Dropped, LeaseLostError):
        resumed.hand_over()
        raise


def _own_headers(given: Any, *, eager: bool) -> dict[str, Any] | None:
    """A copy of the caller's headers to carry the key in, merged as Celery merges them (and
    failing as Celery fails). None for eager Celery given headers of another shape: it hands
    them to the request as they are, so they are passed on untouched."""
    if eager and given is not None and not isinstance(given, Mapping):
        return None
    headers: dict[str, Any] = {}
    headers.update(given or {})
    return headers


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


def _follow(task_id: str, headers: dict[str, Any]) -> None:
    """Mark a retry with the attempt publishing it, so it waits for that attempt's body to
    end instead of being taken for a duplicate (``Guard.begin(follows=...)``)."""
    headers.pop(FOLLOWS_HEADER, None)
    for entry in _entered.get():
        attempt = entry.delivery.attempt if entry.delivery is not None else None
        if attempt is not None and attempt.task_id == task_id:
            headers[FOLLOWS_HEADER] = attempt.attempt_id


def _release_predecessor(request: Any) -> None:
    """Celery < 5.7 runs an eager retry inside its predecessor's body: give that key back."""
    for entry in _entered.get():
        earlier = entry.request
        if (
            entry.delivery is not None
            and earlier is not request
            and earlier.id == request.id
            and int(earlier.retries or 0) < int(request.retries or 0)
        ):
            entry.delivery.release(Retry("eager retry"))


def _eager_policy(policy: Policy) -> Policy:
    """Eager mode has no broker to defer to: wait (bounded by ``wait_timeout``) instead, and
    let a store error surface."""
    return dataclasses.replace(
        policy,
        on_running="wait" if policy.on_running == "defer" else policy.on_running,
        on_store_error="raise" if policy.on_store_error == "defer" else policy.on_store_error,
    )
