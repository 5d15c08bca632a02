"""Every guard decision, logged with structured fields and passed to registered observers
(metrics and tracing integrations are observers)."""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from idemtask.identity import Call

logger = logging.getLogger("idemtask")


class Decision(str, enum.Enum):
    """What the guard decided: an event's name in the logs (``idemtask_decision``), the
    metrics' ``decision`` label and the span events (``docs/observability.md``), so the
    values are public and do not change.

    Not a store answer (``idemtask.store.Status``) nor a record's state
    (``idemtask.store.State``): one answer can lead to different decisions (``Acquired`` is
    ``ACQUIRED`` or ``TAKEOVER``, ``Done`` is ``REPLAYED``), and ``POISON`` is the decision
    on a ``Poisoned`` answer (``Status.POISONED``).
    """

    NEW = "new"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    ACQUIRED = "acquired"
    TAKEOVER = "takeover"
    REPLAYED = "replayed"
    DEFERRED = "deferred"
    DROPPED = "dropped"
    BUSY = "busy"
    COMPLETED = "completed"
    RELEASED = "released"
    STALE_COMPLETION = "stale_completion"
    LEASE_LOST = "lease_lost"
    FAILED = "failed"
    POISON = "poison"
    STORE_UNAVAILABLE = "store_unavailable"
    RENEWED = "renewed"  # one renewal round trip for every lease the process holds


_WARNINGS = {
    Decision.CONFLICT,
    Decision.STALE_COMPLETION,
    Decision.LEASE_LOST,
    Decision.POISON,
    Decision.STORE_UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class Event:
    decision: Decision
    task_name: str
    key: str
    task_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    duration: float | None = None  # seconds the store call took, where one was made


Observer = Callable[[Event], None]
_observers: list[Observer] = []
_lock = threading.Lock()


def add_observer(observer: Observer) -> None:
    with _lock:
        if observer not in _observers:
            _observers.append(observer)


def remove_observer(observer: Observer) -> None:
    with _lock:
        if observer in _observers:
            _observers.remove(observer)


def emit(
    decision: Decision,
    call: Call | None,
    task_id: str = "",
    *,
    duration: float | None = None,
    **fields: Any,
) -> None:
    """Log one decision about ``call`` (None for process-wide events such as a renewal) and
    pass it to every observer."""
    if decision in _WARNINGS:
        level = logging.WARNING
    elif decision is Decision.RENEWED:
        level = logging.DEBUG
    else:
        level = logging.INFO
    logged = logger.isEnabledFor(level)
    if not logged and not _observers:
        return  # nobody listens: build nothing (this runs several times per task)
    task_name, key = (call.task_name, call.key) if call is not None else ("", "")
    if logged:
        detail = "".join(f" {k}={v}" for k, v in fields.items())
        logger.log(
            level,
            "idemtask %s task=%s id=%s key=%s%s",
            decision.value,
            task_name,
            task_id,
            key,
            detail,
            extra={
                "idemtask_decision": decision.value,
                "idemtask_task": task_name,
                "idemtask_key": key,
                "idemtask_task_id": task_id,
                "idemtask_fields": fields,
            },
        )
    if not _observers:
        return
    event = Event(decision, task_name, key, task_id, fields, duration)
    for observer in tuple(_observers):
        try:
            observer(event)
        except Exception:  # an observer must never break a task
            logger.exception("idemtask observer %r failed", observer)
