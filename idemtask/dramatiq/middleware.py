"""``IdempotencyMiddleware``: idempotent Dramatiq actors under at-least-once delivery.

Register it before Retries::

    broker.add_middleware(IdempotencyMiddleware(redis_url=...), before=Retries)

Where each decision is taken, and why:

* **Declaration** (``before_declare_actor``, and ``after_declare_actor`` for actors declared
  before the middleware was added): options are validated into a ``Policy`` and bad
  values raise ``InvalidActorOptions`` from the decorator. ``actor.fn`` is wrapped (so
  a replayed value is the actor's return value and flows through Results, Pipelines, group
  callbacks and ``on_success`` like any other) and ``actor.send_with_options`` is wrapped
  (so a duplicate ``send()`` can hand back the original message without a custom actor
  class: ``send()`` looks the method up on the instance).
* **Enqueue**: the key is derived once and stored in ``message.options`` (``idemtask_key``,
  ``idemtask_fingerprint``). Direct sends reserve the key first and return a handle carrying
  the original ``message_id`` for a duplicate. ``before_enqueue`` only stamps messages
  enqueued by other paths (pipelines, groups, callbacks); it never treats a message that
  already carries a key as a duplicate, so delayed re-enqueues, Retries and the RabbitMQ
  publish retry loop pass through. It raises only for arguments that cannot be keyed.
* **Execute**: ``guard.begin`` runs in ``before_process_message``, after AgeLimit (an expired
  message takes no lease) and TimeLimit (a ``wait`` counts against the time limit), and before
  Retries. That is the only place a delivery can be set aside *without* running the actor:
  a deferred copy (same ``message_id``, ``retries`` unchanged) is enqueued with a delay and
  this copy is skipped with ``store_results`` switched off on it, so Results stores no
  ``None`` for it and Retries, Pipelines and group barriers do not see it. Every other
  decision is handed to the ``actor.fn`` wrapper through a context variable: it runs the body
  under the lease, records the outcome, returns a replayed value, or raises the guard's error
  so Dramatiq's normal exception path (Retries, Results, dead letters) applies. Errors are
  raised from the wrapper rather than from the hook because ``emit_before`` swallows anything
  that is not a ``MiddlewareError``. Errors that no retry can fix (a terminal failure, a
  conflicting payload, a poisoned key, unkeyable arguments) are marked as ``throws`` on this
  delivery, so Retries fails the message at once instead of retrying it.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.broker import Broker, MessageProxy
from dramatiq.message import Message
from dramatiq.middleware import Middleware, SkipMessage
from dramatiq.results import ResultMissing, Results

from idemtask.codecs import Codec
from idemtask.config import Settings, resolve_settings
from idemtask.errors import (
    ConfigurationError,
    IdempotencyConflict,
    KeyDerivationError,
    TaskFailedError,
)
from idemtask.guard import Attempt, Call, Deferred, Dropped, Existing, Guard, Replay
from idemtask.keys import DerivedKey, bind_arguments, derive_key, explicit_key, validate_key_spec
from idemtask.policy import POLICY_OPTIONS, Policy
from idemtask.runtime import guard_for
from idemtask.store.base import State

from .codec import EncoderCodec
from .errors import InvalidActorOptions, UnkeyableMessage

logger = logging.getLogger("idemtask.dramatiq")

#: Message options idemtask writes; they travel with the message through every broker.
KEY_OPTION = "idemtask_key"
FINGERPRINT_OPTION = "idemtask_fingerprint"
DEFERRALS_OPTION = "idemtask_deferrals"
#: Actor options, by the policy option each sets. Dramatiq's Results middleware already owns
#: ``result_ttl`` (milliseconds), so idemtask's (seconds) is ``idempotency_result_ttl`` here.
ACTOR_OPTIONS = {
    ("idempotency_result_ttl" if name == "result_ttl" else name): name for name in POLICY_OPTIONS
}
#: The per-send option for a caller-given key: ``send_with_options(idempotency_key="...")``.
EXPLICIT_KEY_OPTION = "idempotency_key"

#: Errors that no retry can fix: the delivery fails at once (dead letter) instead.
_UNRETRYABLE: tuple[type[BaseException], ...] = (
    TaskFailedError,
    IdempotencyConflict,
    KeyDerivationError,
)


@dataclass(slots=True)
class _Pending:
    """What ``before_process_message`` decided, for the ``actor.fn`` wrapper to carry out."""

    actor_name: str
    final: Callable[[type[BaseException]], None]  # makes Retries fail this delivery at once
    call: Call | None = None
    decision: Attempt | Replay | BaseException | None = None  # None: run unguarded
    ran: bool = False  # the wrapper took it: one delivery, one guarded body
    throws: tuple[Any, ...] | None = None  # ("throws" option before ours) to restore


_pending: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar(
    "idemtask_dramatiq_pending", default=None
)


class IdempotencyMiddleware(Middleware):
    """Makes actors declared with ``idempotent=True`` idempotent.

    ``settings`` are idemtask settings (``lease``, ``result_ttl``, ``on_running``, …); they are
    merged with Django ``settings.IDEMTASK`` and ``IDEMTASK_*`` environment variables, these
    arguments winning. ``default_idempotent=True`` guards every actor that does not say
    ``idempotent=False``.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        default_idempotent: bool = False,
        codec: Codec | None = None,
        **settings: Any,
    ) -> None:
        explicit = dict(settings)
        if redis_url is not None:
            explicit["redis_url"] = redis_url
        if "idempotent" in explicit:  # as a middleware setting: the default for every actor
            given = {"idempotent": explicit.pop("idempotent")}
            default_idempotent = (
                Policy().with_options(given, source="IdempotencyMiddleware").idempotent
            )
        self.settings: Settings = resolve_settings(explicit, framework_name="IdempotencyMiddleware")
        self.default_idempotent = default_idempotent
        self.codec: Codec = codec or EncoderCodec()
        self._policies: dict[str, Policy] = {}
        self._functions: dict[str, Callable[..., Any]] = {}

    # -- configuration -------------------------------------------------------------------

    @property
    def actor_options(self) -> set[str]:
        return set(ACTOR_OPTIONS)

    @property
    def guard(self) -> Guard:
        """This process's guard (opened lazily, and again in a forked worker process)."""
        return guard_for(self.settings)

    def policy_for(self, actor_name: str) -> Policy | None:
        """The policy of an idempotent actor, None for actors this middleware leaves alone."""
        return self._policies.get(actor_name)

    def before_declare_actor(self, broker: Broker, actor: dramatiq.Actor[Any, Any]) -> None:
        self._configure(actor)

    def after_declare_actor(self, broker: Broker, actor: dramatiq.Actor[Any, Any] | str) -> None:
        if isinstance(actor, str):
            # Dramatiq < 2.0's add_middleware passes the names of actors declared earlier.
            actor = broker.get_actor(actor)
        if actor.actor_name not in self._functions:  # declared before the middleware was added
            self._configure(actor)
        self._install(broker, actor)

    def _configure(self, actor: dramatiq.Actor[Any, Any]) -> None:
        name = actor.actor_name
        options = {ACTOR_OPTIONS[k]: v for k, v in actor.options.items() if k in ACTOR_OPTIONS}
        enabled = options.pop("idempotent", self.default_idempotent)
        source = f"actor {name}"
        try:
            policy = self.settings.defaults.with_options(options, source=source)
            if not isinstance(enabled, bool):
                raise ConfigurationError(f"{source}: idempotent must be True or False")
            fn = _original(actor)
            validate_key_spec(fn, policy.idempotency_key, task_name=name)
        except ConfigurationError as exc:
            raise InvalidActorOptions(str(exc)) from exc
        self._functions[name] = fn
        if enabled:
            self._policies[name] = policy
        else:
            self._policies.pop(name, None)

    def _install(self, broker: Broker, actor: dramatiq.Actor[Any, Any]) -> None:
        """Wrap ``fn`` and ``send_with_options`` once per actor object."""
        if actor.actor_name not in self._policies or getattr(actor, "_idemtask_installed", False):
            return
        name = actor.actor_name
        inner = actor.fn

        @functools.wraps(inner)
        def guarded_fn(*args: Any, **kwargs: Any) -> Any:
            pending = _pending.get()
            if pending is None or pending.actor_name != name or pending.ran:
                return inner(*args, **kwargs)  # a plain call, outside a worker delivery
            pending.ran = True
            return self._carry_out(pending, lambda: inner(*args, **kwargs))

        send = actor.send_with_options

        @functools.wraps(send)
        def send_with_options(
            *,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
            delay: int | None = None,
            **options: Any,
        ) -> Message[Any]:
            return self._send(broker, actor, args, kwargs or {}, delay, options)

        actor.fn = guarded_fn
        setattr(actor, "send_with_options", send_with_options)  # noqa: B010 - instance override
        setattr(actor, "_idemtask_installed", True)  # noqa: B010

    # -- enqueue -------------------------------------------------------------------------

    def _send(
        self,
        broker: Broker,
        actor: dramatiq.Actor[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        delay: int | None,
        options: dict[str, Any],
    ) -> Message[Any]:
        """``send_with_options`` for idempotent actors: reserve the key, then publish."""
        message: Message[Any] = actor.message_with_options(args=args, kwargs=kwargs, **options)
        policy = self._policies[actor.actor_name]
        call = self._stamp(message, policy)  # UnkeyableMessage: nothing is enqueued
        existing = self.guard.reserve(policy, call, message.message_id, delay=(delay or 0) / 1000)
        if existing is not None:
            return self._existing_handle(broker, message, existing)
        try:
            return broker.enqueue(message, delay=delay)
        except BaseException:
            self.guard.cancel(call, message.message_id)
            raise

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        """Stamp the key on messages that did not come through ``send`` (canvas, callbacks)."""
        policy = self._policies.get(message.actor_name)
        if policy is None or KEY_OPTION in message.options:
            return
        self._stamp(message, policy)

    def _stamp(self, message: Message[Any] | MessageProxy, policy: Policy) -> Call:
        """The message's call, keyed once: the key rides in the options from then on."""
        options = message.options
        if KEY_OPTION in options:
            return Call(
                message.actor_name, options[KEY_OPTION], options.get(FINGERPRINT_OPTION, "")
            )
        explicit = options.pop(EXPLICIT_KEY_OPTION, None)
        try:
            derived = self.derive(message.actor_name, message.args, message.kwargs, explicit)
        except KeyDerivationError as exc:
            refused = UnkeyableMessage(str(exc))
            refused.path = exc.path
            raise refused from exc
        options[KEY_OPTION] = derived.key
        options[FINGERPRINT_OPTION] = derived.fingerprint
        return Call(message.actor_name, derived.key, derived.fingerprint)

    def derive(
        self,
        actor_name: str,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        explicit: str | None = None,
    ) -> DerivedKey:
        """The key of one call, as both adapters derive it (same name and arguments, same key)."""
        policy = self._policies[actor_name]
        fn = self._functions[actor_name]
        arguments = bind_arguments(fn, args, kwargs, task_name=actor_name)
        version = policy.idempotency_key_version
        if explicit is not None:
            return explicit_key(actor_name, explicit, version=version, arguments=arguments)
        return derive_key(
            actor_name,
            arguments,
            spec=policy.idempotency_key,
            version=version,
            args=tuple(args),
            kwargs=kwargs,
        )

    def _existing_handle(
        self, broker: Broker, message: Message[Any], existing: Existing
    ) -> Message[Any]:
        """A handle to the original message: ``get_result()`` reads the original's result."""
        handle: Message[Any] = message.copy(message_id=existing.task_id)
        if existing.state is State.DONE and existing.result is not None:
            self._refill_result(broker, handle, existing)
        return handle

    def _refill_result(self, broker: Broker, handle: Message[Any], existing: Existing) -> None:
        """Put the recorded result back in the Results backend when it expired there first
        (idemtask keeps results for ``result_ttl``, Dramatiq's backend for its own TTL)."""
        results = next((m for m in broker.middleware if isinstance(m, Results)), None)
        actor = broker.get_actor(handle.actor_name)
        if results is None or not actor.options.get("store_results", results.store_results):
            return
        assert existing.result is not None
        try:
            results.backend.get_result(handle, block=False)
            return
        except ResultMissing:
            pass
        except Exception:  # a result stored as an exception, or an unreachable backend
            return
        ttl = actor.options.get("result_ttl", results.result_ttl)
        try:
            value = self.codec.decode(existing.result.data)
            results.backend.store_result(handle, value, ttl)
        except Exception:
            logger.warning("idemtask could not refill the result of %s", handle.message_id)

    # -- execute -------------------------------------------------------------------------

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        _pending.set(None)
        policy = self._policies.get(message.actor_name)
        if policy is None:
            return

        def final(error: type[BaseException]) -> None:
            if pending.throws is None:
                pending.throws = _no_retry(broker, message, error)

        pending = _Pending(message.actor_name, final)
        _pending.set(pending)
        try:
            pending.call = self._stamp(message, policy)
            pending.decision = self.guard.begin(policy, pending.call, message.message_id)
        except Deferred as deferred:
            self._defer(broker, message, deferred, pending)
        except Dropped as dropped:
            _pending.set(None)
            message.options["store_results"] = False  # the holder stores the result
            raise SkipMessage(str(dropped)) from None
        except Exception as exc:
            pending.decision = exc
            if isinstance(exc, _UNRETRYABLE):
                final(type(exc))

    def _defer(
        self, broker: Broker, message: MessageProxy, deferred: Deferred, pending: _Pending
    ) -> None:
        """Enqueue the same message (same id, same retry count) for later; skip this copy."""
        deferrals = int(message.options.get(DEFERRALS_OPTION, 0)) + 1
        later: Message[Any] = message.copy(options={DEFERRALS_OPTION: deferrals})
        try:
            broker.enqueue(later, delay=max(1, int(deferred.delay * 1000)))
        except Exception as exc:  # the broker refused: keep this copy by failing it to Retries
            logger.warning("idemtask could not defer %s: %s", message.message_id, exc)
            pending.decision = exc
            return
        _pending.set(None)
        message.options["store_results"] = False  # no None result for the set-aside copy
        raise SkipMessage(f"idemtask deferred: {deferred.reason}")

    def _carry_out(self, pending: _Pending, body: Callable[[], Any]) -> Any:
        decision = pending.decision
        if decision is None:
            return body()
        if isinstance(decision, BaseException):
            raise decision
        if isinstance(decision, Replay):
            return decision.value(self.codec)
        guard = self.guard
        with guard.holding(decision, self.codec):
            try:
                value = body()
            except BaseException as exc:
                guard.fail(decision, exc)
                if isinstance(exc, decision.policy.terminal_exceptions):
                    pending.final(type(exc))  # recorded as failed: a retry would only replay it
                raise
        return guard.succeed(decision, value, self.codec)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        self._finish(message, exception or RuntimeError("the actor was not called"))

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self._finish(message, SkipMessage("skipped by another middleware"))

    def _finish(self, message: MessageProxy, reason: BaseException) -> None:
        """Runs after Retries (we sit before it, and ``emit_after`` goes in reverse).

        Puts back the ``throws`` option Retries has now read, so Callbacks' ``on_failure``
        can encode the message; gives back a lease taken for a delivery whose body never ran
        (another middleware skipped or failed it) rather than leaving it to expire.
        """
        pending = _pending.get()
        _pending.set(None)
        if pending is None:
            return
        if pending.throws is not None:
            if pending.throws:
                message.options["throws"] = pending.throws[0]
            else:
                message.options.pop("throws", None)
        if not pending.ran and isinstance(pending.decision, Attempt):
            self.guard.fail(pending.decision, reason)


def _original(actor: dramatiq.Actor[Any, Any]) -> Callable[..., Any]:
    """The function keys are bound to: ``actor.fn`` before idemtask wraps it. For an async
    actor that is Dramatiq's ``async_to_sync`` wrapper, whose ``__wrapped__`` gives the
    coroutine function's signature."""
    fn: Callable[..., Any] = actor.fn
    return fn


def _no_retry(broker: Broker, message: MessageProxy, error: type[BaseException]) -> tuple[Any, ...]:
    """Make Retries fail this delivery at once: the error will not change on a retry.

    Returns what to restore afterwards: ``()`` if the message had no ``throws`` option,
    else ``(previous value,)``.
    """
    had = "throws" in message.options
    previous = message.options.get("throws")
    throws = previous
    if throws is None:
        try:
            throws = broker.get_actor(message.actor_name).options.get("throws")
        except Exception:
            throws = None
    if throws is None:
        merged: tuple[type[BaseException], ...] = (error,)
    elif isinstance(throws, tuple):
        merged = (*throws, error)
    else:
        merged = (throws, error)
    message.options["throws"] = merged
    return (previous,) if had else ()
