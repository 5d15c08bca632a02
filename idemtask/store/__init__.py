"""Record stores: the protocol, its typed answers, the Redis store for workers, the
in-process store."""

from typing import TYPE_CHECKING

from idemtask.store.base import (
    AcquireAnswer,
    Acquired,
    Answer,
    Busy,
    CancelAnswer,
    CompleteAnswer,
    Completed,
    Conflict,
    Done,
    Duplicate,
    Failed,
    Held,
    Lease,
    New,
    Poisoned,
    Record,
    Recorded,
    ReleaseAnswer,
    Released,
    ReserveAnswer,
    Stale,
    State,
    Status,
    StepAnswer,
    StepsAnswer,
    Store,
    StoredResult,
)
from idemtask.store.memory import MemoryStore
from idemtask.store.redis import RedisStore

if TYPE_CHECKING:
    Outcome = Answer  # deprecated: the union of every answer type
else:

    def __getattr__(name: str) -> object:
        """``Outcome``, the one answer type before answers were typed per status, is now the
        union ``Answer``; importing it still works, with a ``DeprecationWarning``."""
        if name == "Outcome":
            import warnings

            warnings.warn(
                "idemtask.store.Outcome is deprecated: store operations answer typed "
                "answers (idemtask.store.Answer and its members, such as Acquired)",
                DeprecationWarning,
                stacklevel=2,
            )
            return Answer
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AcquireAnswer",
    "Acquired",
    "Answer",
    "Busy",
    "CancelAnswer",
    "CompleteAnswer",
    "Completed",
    "Conflict",
    "Done",
    "Duplicate",
    "Failed",
    "Held",
    "Lease",
    "MemoryStore",
    "New",
    "Poisoned",
    "Record",
    "Recorded",
    "RedisStore",
    "ReleaseAnswer",
    "Released",
    "ReserveAnswer",
    "Stale",
    "State",
    "Status",
    "StepAnswer",
    "StepsAnswer",
    "Store",
    "StoredResult",
]
