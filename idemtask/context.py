"""``idemtask.current()``: what the running body knows about its own guard."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from idemtask.steps import StepLog


@dataclass(slots=True)
class Execution:
    """The attempt a body runs under. ``fencing_token`` grows with every attempt on a key:
    pass it to downstream writes so a store can refuse a stale holder."""

    key: str
    task_name: str
    task_id: str
    attempt_id: str
    fencing_token: int
    takeover: bool
    # Set once by the renewal thread and only read by the body: a plain flag is enough (an
    # attribute store is atomic), and costs nothing per task, unlike a threading.Event.
    _lost: bool = field(default=False, repr=False)
    #: The attempt's steps (``idemtask.step``); None when nothing records them (unguarded).
    steps: StepLog | None = field(default=None, repr=False)

    @property
    def lease_lost(self) -> bool:
        """True once renewal found another attempt holds the key; stop writing then."""
        return self._lost

    def mark_lease_lost(self) -> None:
        self._lost = True


_current: contextvars.ContextVar[Execution | None] = contextvars.ContextVar(
    "idemtask_execution", default=None
)


def current() -> Execution:
    """The execution of the idempotent body running in this context."""
    execution = _current.get()
    if execution is None:
        raise LookupError("idemtask.current() called outside an idempotent task body")
    return execution


def running() -> Execution | None:
    """The running body's execution, or None outside one."""
    return _current.get()


def activate(execution: Execution | None) -> contextvars.Token[Execution | None]:
    return _current.set(execution)


def deactivate(token: contextvars.Token[Execution | None]) -> None:
    _current.reset(token)
