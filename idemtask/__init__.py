"""idemtask: idempotent Celery tasks and Dramatiq actors under at-least-once delivery."""

from __future__ import annotations

from idemtask.context import Execution, current
from idemtask.errors import (
    AlreadyRunningError,
    ConfigurationError,
    DuplicateTaskError,
    IdempotencyConflict,
    IdempotencyError,
    KeyDerivationError,
    LeaseLostError,
    PoisonMessageError,
    ResultTooLargeError,
    StoreUnavailable,
    TaskFailedError,
)
from idemtask.steps import DuplicateStepError, Step, StepValueError, step
from idemtask.store.base import Record

__version__ = "0.1.0"


def inspect(key: str) -> Record | None:
    """The record for ``key`` in the store the settings (environment, Django) name."""
    from idemtask.runtime import default_guard

    return default_guard().store.inspect(key)


def forget(key: str) -> bool:
    """Delete the record for ``key`` so the next call runs again; True if there was one."""
    from idemtask.runtime import default_guard

    return default_guard().store.forget(key)


__all__ = [
    "AlreadyRunningError",
    "ConfigurationError",
    "DuplicateStepError",
    "DuplicateTaskError",
    "Execution",
    "IdempotencyConflict",
    "IdempotencyError",
    "KeyDerivationError",
    "LeaseLostError",
    "PoisonMessageError",
    "Record",
    "ResultTooLargeError",
    "Step",
    "StepValueError",
    "StoreUnavailable",
    "TaskFailedError",
    "__version__",
    "current",
    "forget",
    "inspect",
    "step",
]
