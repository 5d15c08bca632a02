"""``IdempotentTask``: the Celery side of the guard.

Enqueue (``apply_async``) keys the call once (``Identity``), carries the key in the message
headers bound to this task and message, and publishes inside ``Guard.publishing``. Execute
(``__call__``) drives one ``Delivery`` per message: run the body under its lease, replay the
stored result, defer the message or drop it. This module only translates between Celery's
events and those core calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from celery.exceptions import Ignore, Retry
from kombu.utils.uuid import uuid

from idemtask.celery import calls, running
from idemtask.celery.config import (
    app_settings,
    check_task_class,
    codec_for,
    task_identity,
)
from idemtask.celery.django import OnCommit
from idemtask.celery.replace import HandsOverOnReplace
from idemtask.errors import (
    AlreadyRunningError,
    ConfigurationError,
    KeyDerivationError,
    LeaseLostError,
)
from idemtask.guard import Deferred, Dropped, Guard, inline
from idemtask.identity import (
    FINGERPRINT_FIELD,
    KEY_FIELD,
    Identity,
    carry,
    deferrals,
    follow,
    followed,
)
from idemtask.keys import DerivedKey
from idemtask.policy import Policy
from idemtask.runtime import guard_for

#: Message headers that carry the key computed at enqueue (see ``idemtask.identity``).
KEY_HEADER = KEY_FIELD
FINGERPRINT_HEADER = FINGERPRINT_FIELD
#: The per-call option of ``apply_async``; popped before Celery sees the options.
KEY_OPTION = "idempotency_key"


class IdempotentTask(OnCommit, HandsOverOnReplace):
    """A Celery task that runs its body at most once per idempotency key.

    Use per task (``@app.task(base=IdempotentTask, lease=30)``) or for a whole app
    (``Celery(..., task_cls=IdempotentTask)``). Every option of
    ``POLICY_OPTIONS`` may be given as a decorator keyword; defaults come
    from ``app.conf.idemtask``. ``idempotent=False`` makes it a plain Task.
    """

    # -- configuration --------------------------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_task_class(cls)  # a misspelt option fails where Celery creates the class

    def idemtask_identity(self) -> Identity | None:
        """How this task's calls are keyed (None when not guarded); raises ConfigurationError."""
        return task_identity(self)

    def idemtask_policy(self) -> Policy | None:
        """The resolved policy (None when not guarded); raises ConfigurationError."""
        identity = task_identity(self)
        return None if identity is None else identity.policy

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

    def _guarded(self) -> tuple[Identity | None, Guard]:
        """The identity and the process's guard, from one read of the app's settings."""
        settings = app_settings(self.app)
        return task_identity(self, settings), guard_for(settings)

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
        identity, guard = self._guarded()
        if identity is None:
            if explicit is not None:
                raise ConfigurationError(
                    f"idempotency_key given to apply_async of {self.name}, which is not idempotent"
                )
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        given = options.pop("headers", None)
        headers = calls.own_headers(given, eager=bool(self.app.conf.task_always_eager))
        message_id = task_id or uuid()
        resubmit = message_id == self.request.id
        passthrough = resubmit or calls.passes_through(link, link_error, options)
        serializer, call_args = options.get("serializer"), (args, kwargs)

        def publish() -> Any:
            return super(IdempotentTask, self).apply_async(
                args, kwargs, message_id, producer, link, link_error, shadow,
                headers=given if headers is None else headers, **options,
            )  # fmt: skip

        try:
            call = identity.resolve(headers, message_id, args, kwargs, explicit=explicit)
        except Exception as exc:
            calls.refuse_as_celery(self, call_args, serializer, exc)
            if not isinstance(exc, KeyDerivationError) or not passthrough or explicit is not None:
                raise  # nothing is published
            # A canvas step sent by a worker (its arguments include the previous result):
            # refusing it here would break the workflow silently; the execute side raises
            # the same error as this task's failure, where errbacks see it.
            return publish()
        if headers is not None:
            carry(call, message_id, headers)
            if resubmit and int(options.get("retries") or 0) > int(self.request.retries or 0):
                follow(running.attempt_of(message_id), headers)
        reserve, delay = not passthrough, calls.delay_of(options)
        with guard.publishing(
            identity.policy, call, message_id, delay=delay, reserve=reserve
        ) as found:
            if found is None:
                return publish()
        if task_id is None:  # a duplicate: Celery never sees it, so ask Celery's checks here
            calls.refuse_as_celery(self, call_args, serializer, None)
            return calls.existing_handle(self, found, call)
        # The caller fixed the id in advance (a frozen signature, e.g. a chord body) and
        # waits on that id: publish, and the execute guard replays under it.
        return publish()

    # -- execute --------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Guard one delivery. Direct calls (``task(...)``, and a body calling its own task)
        run as on a plain Task; so does every call of a task that is not guarded."""
        request = self.request
        if request.called_directly or running.is_running(request):
            return super().__call__(*args, **kwargs)
        with running.entering(request) as entry:
            identity, guard = self._guarded()
            if identity is None:
                # The tracer already pushed this request; Task.__call__ would push a second
                # one, which a plain task (whose ``run`` the tracer calls) never sees.
                return self.run(*args, **kwargs)
            return self._deliver(identity, guard, entry, args, kwargs)

    def _deliver(
        self,
        identity: Identity,
        guard: Guard,
        entry: running.Entered,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        request = self.request
        eager = bool(request.is_eager)
        policy = inline(identity.policy) if eager else identity.policy
        fields = request.headers if isinstance(request.headers, Mapping) else {}
        call = identity.resolve(fields, request.id, args, kwargs)
        codec = codec_for(self.app)
        if eager:
            running.release_predecessor(request)
        delivery = guard.delivery(
            policy, call, request.id, codec, follows=followed(fields), deferrals=deferrals(fields)
        )
        entry.delivery = delivery

        def body() -> Any:
            value = self.run(*args, **kwargs)
            if isinstance(value, Retry):  # ``return self.retry(throw=False)``: not an answer
                delivery.release(value)
            return value

        resumed = None if eager else self.resumed(fields, request.id, guard, codec, call)
        try:
            if resumed is None:
                return delivery.run(body)
            return resumed.run(lambda: delivery.run(body))
        except Deferred as deferred:
            if eager:  # no broker to defer to: the caller sees why
                lost = deferred.__cause__
                if isinstance(lost, LeaseLostError):
                    raise lost from None
                raise AlreadyRunningError(call.key, "", deferred.delay) from None
            calls.defer(self, args, kwargs, deferred.delay, deferred.reason, deferred.deferrals)
        except Dropped as dropped:
            raise Ignore(str(dropped)) from None
