"""Every exception idemtask raises; all of them subclass :class:`IdempotencyError`."""

from __future__ import annotations


class IdempotencyError(Exception):
    """Base class: ``except IdempotencyError`` catches anything idemtask raises."""


class ConfigurationError(IdempotencyError, ValueError):
    """A setting or task option is unknown or invalid (raised at start-up or declaration)."""


class KeyDerivationError(IdempotencyError, TypeError):
    """The call's arguments cannot be turned into a stable key; nothing was enqueued.

    ``path`` names the offending value, e.g. ``order.items[3]``.
    """

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class DuplicateTaskError(IdempotencyError):
    """A call duplicates one already enqueued, running or done (``on_duplicate="raise"``)."""

    def __init__(self, key: str, existing_task_id: str, state: str) -> None:
        self.key = key
        self.existing_task_id = existing_task_id
        self.state = state
        super().__init__(
            f"duplicate of task {existing_task_id} (state {state}) for idempotency key {key}"
        )


class AlreadyRunningError(IdempotencyError):
    """Another attempt holds the key's lease (``on_running="raise"``)."""

    def __init__(self, key: str, holder_task_id: str, retry_in: float) -> None:
        self.key = key
        self.holder_task_id = holder_task_id
        self.retry_in = retry_in
        super().__init__(
            f"idempotency key {key} is running as task {holder_task_id}; "
            f"its lease ends in {retry_in:.3f}s"
        )


class IdempotencyConflict(IdempotencyError):
    """The key was used before with different arguments (payload fingerprint mismatch)."""

    def __init__(self, key: str, existing_task_id: str) -> None:
        self.key = key
        self.existing_task_id = existing_task_id
        super().__init__(
            f"idempotency key {key} was first used by task {existing_task_id} "
            "with different arguments"
        )


class LeaseLostError(IdempotencyError):
    """This attempt lost its lease and another attempt took the key over.

    Its own completion was rejected; the recorded outcome is delivered on a later try.
    """

    def __init__(self, key: str, message: str = "") -> None:
        self.key = key
        super().__init__(message or f"lease on idempotency key {key} was lost to another attempt")


class TaskFailedError(IdempotencyError):
    """The key's first run failed terminally; the stored error is replayed, not re-run."""

    def __init__(self, key: str, task_id: str, error: str) -> None:
        self.key = key
        self.task_id = task_id
        self.error = error
        super().__init__(f"task {task_id} for idempotency key {key} failed terminally: {error}")


class PoisonMessageError(TaskFailedError):
    """The key was delivered more times than ``max_deliveries`` without finishing."""


class StoreUnavailable(IdempotencyError):
    """The record store cannot be reached; the message is kept, not acked away."""
