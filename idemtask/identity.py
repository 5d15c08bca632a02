"""A call's identity: the one place where a task invocation becomes a key.

Both adapters build every ``Call`` here, at enqueue and at execute, so a call keys the same
whichever framework, producer or path it took. The key derived at enqueue travels with the
message (Celery headers, Dramatiq options) so the worker need not derive it again from
arguments that went through a serializer. A carried key is bound to the task name and the
message id it was derived for: a header forwarded to another message (``headers=
self.request.headers`` on a child task) is not taken as that message's identity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from idemtask.errors import KeyDerivationError
from idemtask.keys import bind_arguments, derive_key, explicit_key, validate_key_spec
from idemtask.policy import Policy

#: Message fields that carry a call's identity from the producer to every delivery.
KEY_FIELD = "idemtask_key"
FINGERPRINT_FIELD = "idemtask_fingerprint"
#: ``[task name, message id]`` the carried key was derived for.
BOUND_FIELD = "idemtask_bound"
#: A retry's field: the attempt that published it and may still be running its body.
FOLLOWS_FIELD = "idemtask_follows"
#: A replacement's field: the call and attempt handed to it,
#: ``[task name, key, fingerprint, attempt id, token, message id]``.
HANDED_FIELD = "idemtask_handed"
#: A deferred copy's field: how often the message was deferred so far (``Guard.delivery``).
DEFERRALS_FIELD = "idemtask_deferrals"


@dataclass(frozen=True, slots=True)
class Call:
    """One task invocation, as the store knows it."""

    task_name: str
    key: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Identity:
    """How the calls of one task are keyed: its name, the function its arguments bind to,
    and its policy (key spec, key version, payload validation).

    ``strict=False`` keys a call whose arguments do not bind to ``fn`` from the arguments as
    given, for frameworks that accept such a call and fail it only when the body runs
    (Celery's ``typing=False``): the call is keyed, not refused at enqueue.
    """

    task_name: str
    fn: Callable[..., Any]
    policy: Policy
    strict: bool = True

    def call(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        *,
        explicit: str | None = None,
    ) -> Call:
        """Derive the call's key from its arguments, or from a caller-given string.

        Raises ``KeyDerivationError`` naming the argument that cannot be keyed. With an
        explicit key and ``validate_payload=False`` the arguments are not encoded at all,
        so they need not be keyable.
        """
        call_args = tuple(args or ())
        call_kwargs = dict(kwargs or {})
        policy = self.policy
        version = policy.idempotency_key_version
        if explicit is not None and not policy.validate_payload:
            derived = explicit_key(self.task_name, explicit, version=version)
            return Call(self.task_name, derived.key, derived.fingerprint)
        arguments = self._bind(call_args, call_kwargs)
        if explicit is not None:
            derived = explicit_key(self.task_name, explicit, version=version, arguments=arguments)
        else:
            derived = derive_key(
                self.task_name,
                arguments,
                spec=policy.idempotency_key,
                version=version,
                args=call_args,
                kwargs=call_kwargs,
                validate_payload=policy.validate_payload,
            )
        return Call(self.task_name, derived.key, derived.fingerprint)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            return bind_arguments(self.fn, args, kwargs, task_name=self.task_name)
        except KeyDerivationError:
            if self.strict:
                raise
            return {"args": list(args), "kwargs": kwargs}  # the body will refuse the call

    def carried(self, fields: Mapping[str, Any] | None, message_id: str) -> Call | None:
        """The call a message carries, if it was derived for this task and this message.

        Messages from before keys were bound carry no binding; their key is trusted.
        """
        if not fields:
            return None
        key = fields.get(KEY_FIELD)
        if not key or not isinstance(key, str):
            return None
        bound = fields.get(BOUND_FIELD)
        if bound is not None and list(bound) != [self.task_name, message_id]:
            return None
        return Call(self.task_name, key, str(fields.get(FINGERPRINT_FIELD) or ""))

    def resolve(
        self,
        fields: Mapping[str, Any] | None,
        message_id: str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        *,
        explicit: str | None = None,
    ) -> Call:
        """The call of one message, at enqueue and at execute: a caller-given key, else the
        carried call (a retry or re-publish keeps it), else one derived from the arguments
        (``send_task`` by name, beat, a producer in another language, a forwarded header)."""
        if explicit is None:
            carried = self.carried(fields, message_id)
            if carried is not None:
                return carried
        return self.call(args, kwargs, explicit=explicit)


def identify(
    task_name: str,
    fn: Callable[..., Any],
    defaults: Policy,
    options: Mapping[str, Any],
    *,
    strict: bool = True,
    kind: str = "task",
) -> Identity | None:
    """A task's identity from its declared options over ``defaults``; None when the task is
    not guarded (``idempotent=False``). Both adapters read every task's options here.
    Raises ``ConfigurationError`` naming the task (``kind``: what the framework calls it)."""
    policy = defaults.with_options(options, source=f"{kind} {task_name}")
    if not policy.idempotent:
        return None
    validate_key_spec(fn, policy.idempotency_key, task_name=task_name)
    return Identity(task_name, fn, policy, strict)


def carry(call: Call, message_id: str, fields: MutableMapping[str, Any]) -> None:
    """Write the call's identity into a message's headers or options."""
    fields[KEY_FIELD] = call.key
    fields[FINGERPRINT_FIELD] = call.fingerprint
    fields[BOUND_FIELD] = [call.task_name, message_id]


def follow(attempt_id: str | None, fields: MutableMapping[str, Any]) -> None:
    """Mark a message as published by ``attempt_id`` while its body runs (a retry)."""
    fields.pop(FOLLOWS_FIELD, None)
    if attempt_id is not None:
        fields[FOLLOWS_FIELD] = attempt_id


def followed(fields: Mapping[str, Any]) -> str | None:
    """The attempt a message was published by (see ``follow``), if any."""
    attempt_id = fields.get(FOLLOWS_FIELD)
    return attempt_id if isinstance(attempt_id, str) else None


@dataclass(frozen=True, slots=True)
class Handed:
    """A call whose attempt was handed to a message (``Guard.delivery(resumes=...)``)."""

    call: Call
    attempt_id: str
    token: int


def hand(handed: Handed, message_id: str, fields: MutableMapping[str, Any]) -> None:
    """Hand an attempt to the message ``message_id`` (a replacement with the same id)."""
    call = handed.call
    fields[HANDED_FIELD] = [
        call.task_name, call.key, call.fingerprint, handed.attempt_id, handed.token, message_id
    ]  # fmt: skip


def handed(fields: Mapping[str, Any], message_id: str) -> Handed | None:
    """The attempt handed to this message, if it was handed to this very message."""
    value = fields.get(HANDED_FIELD)
    if not isinstance(value, (list, tuple)) or len(value) != 6 or value[5] != message_id:
        return None
    name, key, fingerprint, attempt_id, token, _ = value
    return Handed(Call(str(name), str(key), str(fingerprint)), str(attempt_id), int(token))


def count_deferrals(count: int | None, fields: MutableMapping[str, Any]) -> None:
    """Mark a deferred copy with how often its message was deferred (None: leave as is)."""
    if count is not None:
        fields[DEFERRALS_FIELD] = count


def deferrals(fields: Mapping[str, Any]) -> int:
    """How often this message was deferred so far (see ``count_deferrals``); 0 if unmarked."""
    value = fields.get(DEFERRALS_FIELD)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 0


def strip(fields: MutableMapping[str, Any]) -> None:
    """Remove a carried identity (before forwarding fields to another message)."""
    for name in (KEY_FIELD, FINGERPRINT_FIELD, BOUND_FIELD, FOLLOWS_FIELD, HANDED_FIELD):
        fields.pop(name, None)
    fields.pop(DEFERRALS_FIELD, None)
