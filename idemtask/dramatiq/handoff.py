"""What Dramatiq's execute path hands from the middleware's hook to the actor's body.

Dramatiq can only skip a message from a hook (``before_process_message``), but only the
actor's own frame lets Retries, Results and dead letters see an error (``emit_before`` would
swallow it). So the hook decides the message's ``Delivery`` and hands it, with its way of
deferring the message, to the ``fn`` wrapper in one ``Handoff`` (a context variable of the
worker thread); the after hooks ``close`` it. A body that ran but left the key unrecorded
(its completion refused, or its lease taken over) is deferred through the same hand-off.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NoReturn

from dramatiq.broker import MessageProxy
from dramatiq.middleware import SkipMessage

from idemtask.guard import Deferred, Delivery


@dataclasses.dataclass(frozen=True, slots=True)
class Handoff:
    """The message's delivery, and how to set the message aside for later."""

    delivery: Delivery
    defer: Callable[[Deferred], None]

    def runs_body_of(self, actor_name: str) -> bool:
        """Whether a call of this actor is the delivery's body, not a nested call."""
        return self.delivery.call.task_name == actor_name and not self.delivery.ran


#: The hand-off of the message this worker thread is processing: made by the hook, run by
#: the ``fn`` wrapper, closed by ``after_process_message`` / ``after_skip_message``.
_current: contextvars.ContextVar[Handoff | None] = contextvars.ContextVar(
    "idemtask_dramatiq_handoff", default=None
)
#: The message whose ``before_process_message`` this worker thread ran last: a skipped message
#: that is not it was set aside before idemtask decided it (AgeLimit, in the default stack).
_reached: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "idemtask_dramatiq_reached", default=None
)


def enter(message_id: str) -> None:
    """The hook reached this message: nothing is handed over yet."""
    _current.set(None)
    _reached.set(message_id)


def reached(message_id: str) -> bool:
    """Whether the hook saw this message (a skip before it is another middleware's)."""
    return _reached.get() == message_id


def hand(delivery: Delivery, defer: Callable[[Deferred], None]) -> None:
    _current.set(Handoff(delivery, defer))


def set_aside(message: MessageProxy, reason: str) -> NoReturn:
    """Skip this copy without running it; Results stores no ``None`` for it."""
    _current.set(None)
    message.options["store_results"] = False
    raise SkipMessage(reason) from None


def close(message: MessageProxy, reason: BaseException) -> None:
    """Runs after Retries (the middleware sits before it, and ``emit_after`` goes in
    reverse): gives back a lease taken for a delivery whose body never ran (another
    middleware skipped or failed it) rather than leaving it to expire."""
    handoff = _current.get()
    _current.set(None)
    if handoff is not None and handoff.delivery.task_id == message.message_id:
        handoff.delivery.abandon(reason)


def guarded(name: str, inner: Callable[..., Any]) -> Callable[..., Any]:
    """``actor.fn`` run through this thread's delivery of the actor; a direct call (outside a
    worker, another actor's body, the body calling itself) is a plain function call."""

    @functools.wraps(inner)
    def guarded_fn(*args: Any, **kwargs: Any) -> Any:
        handoff = _current.get()
        if handoff is None or not handoff.runs_body_of(name):
            return inner(*args, **kwargs)
        delivery = handoff.delivery
        try:
            return delivery.run(lambda: inner(*args, **kwargs))
        except Deferred as deferred:
            if delivery.ran:  # the key is unrecorded: keep the message for later
                handoff.defer(deferred)
            raise  # decided so, or the broker refused the copy: Retries retries it

    return guarded_fn
