"""One store and one guard per settings per process, shared by every adapter in it."""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from idemtask.config import Settings, resolve_settings
from idemtask.errors import ConfigurationError, StoreUnavailable
from idemtask.guard import Guard
from idemtask.redact import redact_text, redact_url
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


def unreachable(settings: Settings) -> str | None:
    """Why the store ``settings`` name does not answer a PING (its URL redacted), or None.

    The check uses a store of its own, closed after it: a worker that forks next does not
    hand this connection to its children."""
    if settings.uses_memory_store:
        return None
    store = open_store(settings)
    if not isinstance(store, RedisStore):
        return None
    try:
        store.ping()
    except StoreUnavailable as exc:
        where = redact_url(settings.redis_url)
        return f"cannot reach the store at {where} ({redact_text(str(exc)).rstrip('.')})"
    finally:
        with contextlib.suppress(Exception):
            store.client.close()
    return None


def warn_if_unshared(settings: Settings, logger: logging.Logger, *, where: str) -> None:
    """At a worker's start: say once that ``memory://`` keeps records in this process only,
    so a duplicate another worker process takes runs again (``where``: the settings that
    lack a ``redis_url``)."""
    if settings.uses_memory_store:
        logger.warning(
            "idemtask: no redis_url %s: the in-process MemoryStore guards nothing across "
            "worker processes or restarts; set redis_url for real workers",
            where,
        )


def warn_if_unreachable(settings: Settings, logger: logging.Logger) -> None:
    """At a worker's start: say once that the store does not answer, rather than let the
    first deferred message be the only sign of it."""
    problem = unreachable(settings)
    if problem is not None:
        logger.warning(
            "idemtask: %s; guarded tasks are deferred (on_store_error) until it answers",
            problem,
        )


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
