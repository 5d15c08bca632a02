"""One store and one guard per settings per process, shared by every adapter in it."""

from __future__ import annotations

import os
import threading

from idemtask.config import Settings, resolve_settings
from idemtask.errors import ConfigurationError
from idemtask.guard import Guard
from idemtask.redact import redact_text
from idemtask.store.base import Store
from idemtask.store.memory import MemoryStore
from idemtask.store.redis import RedisStore

_lock = threading.Lock()
_guards: dict[tuple[int, str, str, int, int], Guard] = {}
_memory = MemoryStore()  # the embedded default: one per process


def open_store(settings: Settings) -> Store:
    """The store ``settings`` name: ``memory://`` is this process's shared MemoryStore; any
    other URL (single server, ``redis+cluster://``, ``redis+sentinel://``) a RedisStore."""
    if settings.uses_memory_store:
        return _memory
    try:
        return RedisStore.from_url(
            settings.redis_url,
            prefix=settings.key_prefix,
            wait_replicas=settings.wait_replicas,
            wait_timeout_ms=settings.wait_timeout_ms,
        )
    except (ConfigurationError, ValueError) as exc:
        refused = exc  # a malformed URL: its message quotes the URL, password and all
    # Raised outside the handler, so the original (unredacted) error is not chained to it.
    raise ConfigurationError(f"redis_url: {redact_text(str(refused))}")


def guard_for(settings: Settings) -> Guard:
    """The process's guard for these settings (created lazily, again after a fork)."""
    ident = (
        os.getpid(),
        settings.redis_url,
        settings.key_prefix,
        settings.wait_replicas,
        settings.wait_timeout_ms,
    )
    with _lock:
        guard = _guards.get(ident)
        if guard is None:
            guard = _guards[ident] = Guard(open_store(settings))
        return guard


def default_guard() -> Guard:
    """The guard from Django settings and ``IDEMTASK_*`` environment variables."""
    return guard_for(resolve_settings())
