"""The requests this context is running an ``IdempotentTask`` body for, with the delivery
guarding each: a body calling its own task runs it plainly, a retry follows the attempt
that published it, and ``replace`` hands that attempt over."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

from celery.exceptions import Retry

from idemtask.guard import Delivery


@dataclasses.dataclass(slots=True)
class Entered:
    """A request this context entered ``__call__`` for, and the delivery guarding it."""

    request: Any
    delivery: Delivery | None = None


_entered: contextvars.ContextVar[tuple[Entered, ...]] = contextvars.ContextVar(
    "idemtask_celery_entered", default=()
)


def is_running(request: Any) -> bool:
    """Whether this context is already inside the body of ``request``."""
    return any(e.request is request for e in _entered.get())


@contextlib.contextmanager
def entering(request: Any) -> Iterator[Entered]:
    entry = Entered(request)
    token = _entered.set((*_entered.get(), entry))
    try:
        yield entry
    finally:
        _entered.reset(token)


def delivery_of(request: Any) -> Delivery | None:
    """The delivery guarding the body of ``request`` in this context."""
    return next((e.delivery for e in _entered.get() if e.request is request), None)


def attempt_of(task_id: str) -> str | None:
    """The attempt this context runs for ``task_id``: a retry follows it."""
    for entry in _entered.get():
        attempt = entry.delivery.attempt if entry.delivery is not None else None
        if attempt is not None and attempt.task_id == task_id:
            return attempt.attempt_id
    return None


def release_predecessor(request: Any) -> None:
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
