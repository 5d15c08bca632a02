"""``IdempotencyMiddleware``: idempotent Dramatiq actors under at-least-once delivery.

Register it before Retries::

    broker.add_middleware(IdempotencyMiddleware(redis_url=...), before=Retries)

It translates Dramatiq's events into core calls (``Identity`` keys every call, ``Guard``
takes every decision):

* **Declaration**: the actor's options become a validated ``Policy`` (or
  ``InvalidActorOptions`` from the decorator). An idempotent actor then gets, once: the
  errors no retry can change (``final_exceptions``) merged into its ``throws`` option, so
  Retries fails them at once; ``fn`` wrapped, so a replayed value is the actor's return value
  for Results, Pipelines, group callbacks and ``on_success``; ``send_with_options`` wrapped
  (``send.py``), so a duplicate ``send()`` returns the original message.
* **Enqueue**: the key is derived once and carried in ``message.options``, bound to the actor
  and the message id. ``before_enqueue`` stamps messages from other paths (canvas,
  callbacks) and never refuses one carrying its key (delayed re-enqueues, Retries, deferrals).
* **Execute**: ``before_process_message`` (after AgeLimit and TimeLimit, before Retries)
  opens the message's ``Delivery`` and decides it. Only a hook can set a message aside
  without running the actor: a deferred one is enqueued again (same id, same ``retries``) and
  this copy skipped, a dropped one skipped, with ``store_results`` off so Results stores no
  ``None``. The decision reaches the body through ``handoff`` (one documented object):
  ``delivery.run`` replays, runs the body under the lease, or raises the decision's error
  from the actor, where Retries, Results and dead letters see it; a body that ran but left
  its key unrecorded is deferred the same way (no retry spent). The after hooks give back a
  lease whose body never ran, and the reservation of a message skipped before the hook
  decided it (AgeLimit).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import dramatiq
from dramatiq.broker import Broker, MessageProxy
from dramatiq.brokers.stub import StubBroker
from dramatiq.message import Message
from dramatiq.middleware import Middleware, SkipMessage

from idemtask.codecs import Codec
from idemtask.config import Settings, resolve_settings
from idemtask.errors import ConfigurationError, KeyDerivationError
from idemtask.guard import Deferred, Dropped, Guard, final_exceptions
from idemtask.identity import (
    DEFERRALS_FIELD,
    FINGERPRINT_FIELD,
    KEY_FIELD,
    Call,
    Identity,
    carry,
    count_deferrals,
    deferrals,
    identify,
)
from idemtask.keys import DerivedKey
from idemtask.policy import POLICY_OPTIONS, Policy
from idemtask.runtime import guard_for, warn_if_unreachable, warn_if_unshared

from . import handoff
from .codec import EncoderCodec
from .errors import InvalidActorOptions, UnkeyableMessage
from .options import check_actor_options
from .send import guarded_send

logger = logging.getLogger("idemtask.dramatiq")

#: Message options idemtask writes; they travel with the message through every broker.
KEY_OPTION = KEY_FIELD
FINGERPRINT_OPTION = FINGERPRINT_FIELD
DEFERRALS_OPTION = DEFERRALS_FIELD
#: Actor options, by the policy option each sets. Dramatiq's Results middleware already owns
#: ``result_ttl`` (milliseconds), so idemtask's (seconds) is ``idempotency_result_ttl`` here.
ACTOR_OPTIONS = {
    ("idempotency_result_ttl" if name == "result_ttl" else name): name for name in POLICY_OPTIONS
}
#: The per-send option for a caller-given key: ``send_with_options(idempotency_key="...")``.
EXPLICIT_KEY_OPTION = "idempotency_key"


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
        #: The settings given here, a layer the CLI puts its own flags over.
        self.arguments: dict[str, Any] = explicit
        self.settings: Settings = resolve_settings(explicit, framework_name="IdempotencyMiddleware")
        self.default_idempotent = default_idempotent
        self.codec: Codec = codec or EncoderCodec()
        self._identities: dict[str, Identity] = {}  # idempotent actors, by name
        self._declared: set[str] = set()  # every actor whose options were read

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
        identity = self._identities.get(actor_name)
        return identity.policy if identity is not None else None

    def derive(
        self,
        actor_name: str,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        explicit: str | None = None,
    ) -> DerivedKey:
        """The key of one call, as both adapters derive it (same name and arguments, same key)."""
        call = self._identities[actor_name].call(args, kwargs, explicit=explicit)
        return DerivedKey(call.key, call.fingerprint)

    def before_declare_actor(self, broker: Broker, actor: dramatiq.Actor[Any, Any]) -> None:
        check_actor_options(broker, actor, ACTOR_OPTIONS)  # a misspelt option is refused
        self._configure(actor)

    def after_worker_boot(self, broker: Broker, worker: dramatiq.Worker) -> None:
        if not self._identities:
            return
        if not isinstance(broker, StubBroker):  # a StubBroker's workers share one process
            warn_if_unshared(self.settings, logger, where="given to IdempotencyMiddleware")
        warn_if_unreachable(self.settings, logger)  # once per worker, before its first message

    def after_declare_actor(self, broker: Broker, actor: dramatiq.Actor[Any, Any] | str) -> None:
        if isinstance(actor, str):
            # Dramatiq < 2.0's add_middleware passes the names of actors declared earlier.
            actor = broker.get_actor(actor)
        if actor.actor_name not in self._declared:  # declared before the middleware was added
            self._configure(actor)
        self._install(actor)

    def _configure(self, actor: dramatiq.Actor[Any, Any]) -> None:
        name = actor.actor_name
        options = {ACTOR_OPTIONS[k]: v for k, v in actor.options.items() if k in ACTOR_OPTIONS}
        options.setdefault("idempotent", self.default_idempotent)
        try:  # keys bind to ``actor.fn`` before it is wrapped
            identity = identify(name, actor.fn, self.settings.defaults, options, kind="actor")
        except ConfigurationError as exc:
            raise InvalidActorOptions(str(exc)) from exc
        self._declared.add(name)
        if identity is not None:
            self._identities[name] = identity
        else:
            self._identities.pop(name, None)

    def _install(self, actor: dramatiq.Actor[Any, Any]) -> None:
        """Set the final exceptions and wrap ``fn`` and ``send_with_options``, once per actor."""
        identity = self._identities.get(actor.actor_name)
        if identity is None or getattr(actor, "_idemtask_installed", False):
            return
        actor.options["throws"] = _merged(actor.options.get("throws"), identity.policy)
        actor.fn = handoff.guarded(actor.actor_name, actor.fn)
        send = guarded_send(actor, self._stamp, identity.policy, self.settings, self.codec)
        setattr(actor, "send_with_options", send)  # noqa: B010 - instance override
        setattr(actor, "_idemtask_installed", True)  # noqa: B010

    # -- enqueue -------------------------------------------------------------------------

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        """Stamp the key on messages that did not come through ``send`` (canvas, callbacks)."""
        if message.actor_name in self._identities:
            self._stamp(message)

    def _stamp(self, message: Message[Any] | MessageProxy) -> Call:
        """The message's call (``Identity.resolve``, a per-send ``idempotency_key`` first),
        carried in its options from then on."""
        identity, options = self._identities[message.actor_name], message.options
        explicit = options.pop(EXPLICIT_KEY_OPTION, None)
        try:
            call = identity.resolve(
                options, message.message_id, message.args, message.kwargs, explicit=explicit
            )
        except KeyDerivationError as exc:
            raise UnkeyableMessage(exc.message, exc.path) from exc
        carry(call, message.message_id, options)
        return call

    # -- execute -------------------------------------------------------------------------

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        """Decide this delivery; set it aside when deferred or dropped.

        Arguments that cannot be keyed raise ``UnkeyableMessage`` here (a ``MiddlewareError``,
        so Dramatiq fails the message as if the actor had raised it); every other error of the
        decision is raised by the ``fn`` wrapper.
        """
        handoff.enter(message.message_id)
        identity = self._identities.get(message.actor_name)
        if identity is None:
            return
        call = self._stamp(message)
        delivery = self.guard.delivery(
            identity.policy,
            call,
            message.message_id,
            self.codec,
            deferrals=deferrals(message.options),
        )
        handoff.hand(delivery, functools.partial(self._defer, broker, message))
        try:
            delivery.decide()
        except Deferred as deferred:
            self._defer(broker, message, deferred)
        except Dropped as dropped:
            handoff.set_aside(message, str(dropped))
        except Exception:
            return  # ``delivery.run`` raises it again, from the actor

    def _defer(self, broker: Broker, message: MessageProxy, deferred: Deferred) -> None:
        """Enqueue the same message (same id and ``retries``) for later and skip this copy;
        if the broker refuses, the actor raises the ``Deferred`` and Retries retries it."""
        carried: dict[str, Any] = {}
        count_deferrals(deferred.deferrals, carried)
        later: Message[Any] = message.copy(options=carried)
        try:
            broker.enqueue(later, delay=max(1, int(deferred.delay * 1000)))
        except Exception as exc:
            logger.warning("idemtask could not defer %s: %s", message.message_id, exc)
            deferred.__cause__ = exc
            return
        handoff.set_aside(message, f"idemtask deferred: {deferred.reason}")

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        handoff.close(message, exception or RuntimeError("the actor was not called"))

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        identity = self._identities.get(message.actor_name)
        if identity is not None and not handoff.reached(message.message_id):
            self.guard.unreserve(identity, message.options, message.message_id)  # AgeLimit
        handoff.close(message, SkipMessage("skipped by another middleware"))


def _merged(throws: Any, policy: Policy) -> tuple[type[BaseException], ...]:
    """The actor's own ``throws`` (a class, a tuple or None) plus the policy's final ones."""
    own = throws if isinstance(throws, tuple) else () if throws is None else (throws,)
    return (*own, *(e for e in final_exceptions(policy) if e not in own))
