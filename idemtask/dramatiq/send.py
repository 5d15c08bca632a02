"""The send path of an idempotent actor: reserve the key, publish, or hand back the original.

``send_with_options`` is wrapped on the actor instance (``send()`` looks it up there), so a
duplicate can return a handle to the original message without a custom actor class.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import dramatiq
from dramatiq.broker import Broker
from dramatiq.message import Message
from dramatiq.results import ResultMissing, Results

from idemtask.codecs import Codec
from idemtask.config import Settings
from idemtask.guard import Existing
from idemtask.identity import Call, carry
from idemtask.policy import Policy
from idemtask.runtime import guard_for
from idemtask.store.base import State

logger = logging.getLogger("idemtask.dramatiq")


def guarded_send(
    actor: dramatiq.Actor[Any, Any],
    stamp: Callable[[Message[Any]], Call],
    policy: Policy,
    settings: Settings,
    codec: Codec,
) -> Callable[..., Message[Any]]:
    """``send_with_options`` of an idempotent actor, with Dramatiq's signature."""

    @functools.wraps(actor.send_with_options)
    def send_with_options(
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> Message[Any]:
        """Reserve the call's key (for ``delay`` longer), then enqueue; a duplicate gets a
        handle to the original instead, and nothing is enqueued."""
        message = actor.message_with_options(args=args, kwargs=kwargs, **options)
        call = stamp(message)  # UnkeyableMessage: nothing is enqueued
        if isinstance(delay, timedelta):  # converted as Dramatiq converts it
            delay = int(delay.total_seconds() * 1000)
        guard, seconds = guard_for(settings), (delay or 0) / 1000
        with guard.publishing(policy, call, message.message_id, delay=seconds) as existing:
            if existing is None:
                return actor.broker.enqueue(message, delay=delay)
        return _existing_handle(actor.broker, message, call, existing, codec)

    return send_with_options


def _existing_handle(
    broker: Broker, message: Message[Any], call: Call, existing: Existing, codec: Codec
) -> Message[Any]:
    """A handle to the original message: ``get_result()`` reads the original's result, and
    enqueued again it is the original (its key is bound to the original's id)."""
    handle: Message[Any] = message.copy(message_id=existing.task_id)
    carry(call, existing.task_id, handle.options)
    if existing.state is State.DONE and existing.result is not None:
        _refill_result(broker, handle, existing, codec)
    return handle


def _refill_result(broker: Broker, handle: Message[Any], existing: Existing, codec: Codec) -> None:
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
        results.backend.store_result(handle, codec.decode(existing.result.data), ttl)
    except Exception:
        logger.warning("idemtask could not refill the result of %s", handle.message_id)
