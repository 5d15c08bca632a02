"""Every exception idemtask raises; all of them subclass ``IdempotencyError``."""

from __future__ import annotations


class IdempotencyError(Exception):
    """Base class: ``except IdempotencyError`` catches anything idemtask raises.

    Every subclass passes its constructor arguments to ``Exception`` (and builds its message
    in ``__str__``), so it survives pickling and Celery's ``cls(*args)`` rebuilding: a
    caller's ``.get()`` raises the same class the worker raised.
    """


class ConfigurationError(IdempotencyError, ValueError):
    """A setting or task option is unknown or invalid (raised at start-up or declaration)."""


class KeyDerivationError(IdempotencyError, TypeError):
    """The call's arguments cannot be turned into a stable key; nothing was enqueued.

    ``path`` names the offending value, e.g. ``order.items[3]``.
    """

    def __init__(self, message: str, path: str = "") -> None:
        self.message = message
        self.path = path
        super().__init__(message, path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class DuplicateTaskError(IdempotencyError):
    """A call duplicates one already enqueued, running or done (``on_duplicate="raise"``)."""

    def __init__(self, key: str, existing_task_id: str, state: str) -> None:
        self.key = key
        self.existing_task_id = existing_task_id
        self.state = state
        super().__init__(key, existing_task_id, state)

    def __str__(self) -> str:
        return (
            f"duplicate of task {self.existing_task_id} (state {self.state}) "
            f"for idempotency key {self.key}"
        )


class AlreadyRunningError(IdempotencyError):
    """Another attempt holds the key's lease (``on_running="raise"``)."""

    def __init__(self, key: str, holder_task_id: str, retry_in: float) -> None:
        self.key = key
        self.holder_task_id = holder_task_id
        self.retry_in = retry_in
        super().__init__(key, holder_task_id, retry_in)

    def __str__(self) -> str:
        return (
            f"idempotency key {self.key} is running as task {self.holder_task_id}; "
            f"its lease ends in {self.retry_in:.3f}s"
        )


class IdempotencyConflict(IdempotencyError):
    """The key was used before with different arguments (payload fingerprint mismatch)."""

    def __init__(self, key: str, existing_task_id: str) -> None:
        self.key = key
        self.existing_task_id = existing_task_id
        super().__init__(key, existing_task_id)

    def __str__(self) -> str:
        return (
            f"idempotency key {self.key} was first used by task {self.existing_task_id} "
            "with different arguments"
        )


class LeaseLostError(IdempotencyError):
    """This attempt lost its lease and another attempt took the key over.

    Its own completion was rejected; the recorded outcome is delivered on a later try.
    """

    def __init__(self, key: str, message: str = "") -> None:
        self.key = key
        self.message = message
        super().__init__(key, message)

    def __str__(self) -> str:
        return self.message or f"lease on idempotency key {self.key} was lost to another attempt"


class TaskFailedError(IdempotencyError):
    """The key's first run failed terminally; the stored error is replayed, not re-run."""

    def __init__(self, key: str, task_id: str, error: str) -> None:
        self.key = key
        self.task_id = task_id
        self.error = error
        super().__init__(key, task_id, error)

    def __str__(self) -> str:
        return f"task {self.task_id} for idempotency key {self.key} failed terminally: {self.error}"


class ResultTooLargeError(IdempotencyError, ValueError):
    """A result encodes larger than ``max_result_bytes``, so the store does not hold it.

    No later delivery could replay it, so the key fails terminally with this error (one key,
    one answer): every handle raises ``TaskFailedError`` naming it, none gets the value.
    """

    def __init__(self, key: str, size: int, limit: int) -> None:
        self.key = key
        self.size = size
        self.limit = limit
        super().__init__(key, size, limit)

    def __str__(self) -> str:
        return f"result not stored ({self.size} bytes > max_result_bytes={self.limit})"


class PoisonMessageError(TaskFailedError):
    """The key was delivered more times than ``max_deliveries`` without finishing."""


class StoreUnavailable(IdempotencyError):
    """The record store failed a call: it cannot be reached (``StoreUnreachable``) or it
    answered with an error reply (``StoreRefused``: out of memory, read-only, ...).

    With the default ``on_store_error="defer"`` a worker never raises it: the message is put
    back for later instead of being acked away.
    """


class StepStoreUnavailable(StoreUnavailable):
    """A step of the running attempt could be neither read nor recorded: the store failed for
    longer than the lease. The body stops there; the guard keeps its message (as
    ``on_store_error`` says) as it does for a completion the store never took."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(key, message)

    def __str__(self) -> str:
        return self.message


class StoreUnreachable(StoreUnavailable):
    """No usable answer from the store: connection refused or reset, a timeout, a cluster
    whose topology is in flux, or a server at ``redis_url`` that does not speak Redis."""


class StoreRefused(StoreUnavailable):
    """The store answered the command with an error reply.

    ``reason`` is the reply's first word as Redis sent it: ``OOM`` (``maxmemory`` reached
    under ``noeviction``), ``MISCONF`` (a failed RDB save stops writes), ``BUSY`` (a long
    script), ``NOPERM`` (ACL), ``READONLY`` (a replica), ``LOADING``, ``WRONGPASS``, ...
    """

    def __init__(self, message: str, reason: str = "ERR") -> None:
        self.message = message
        self.reason = reason
        super().__init__(message, reason)

    def __str__(self) -> str:
        return self.message
