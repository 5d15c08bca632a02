"""Store checks shared by the Celery and Dramatiq doctors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import redis

from idemtask.config import Settings
from idemtask.findings import Finding, Level
from idemtask.redact import redact_url
from idemtask.runtime import open_store, unreachable
from idemtask.store.failures import classify, client_secrets
from idemtask.store.redis import RedisStore


def check_store(settings: Settings, *, in_process_broker: bool = False) -> list[Finding]:
    """Is the store shared between workers, reachable, safe from eviction, and persistent?"""
    if settings.uses_memory_store:
        if in_process_broker:
            return [Finding(Level.OK, "store.shared", "MemoryStore with an in-process broker")]
        return [
            Finding(
                Level.ERROR,
                "store.shared",
                "the store is the in-process MemoryStore: workers in other processes do not "
                "see each other's records",
                "set redis_url (app.conf.idemtask, IdempotencyMiddleware(redis_url=...), "
                "Django settings.IDEMTASK or IDEMTASK_REDIS_URL)",
            )
        ]
    store = open_store(settings)
    if not isinstance(store, RedisStore):
        return [Finding(Level.OK, "store.shared", f"store {type(store).__name__}")]
    problem = unreachable(settings)
    if problem is not None:
        return [Finding(Level.ERROR, "store.reachable", problem, "start Redis or fix redis_url")]
    try:
        return [
            Finding(Level.OK, "store.shared", "a Redis store, shared by every worker"),
            Finding(
                Level.OK, "store.reachable", f"store at {redact_url(settings.redis_url)} answers"
            ),
            _unless_refused(store, "store.eviction", "maxmemory-policy", _eviction),
            _unless_refused(store, "store.persistence", "persistence", _persistence),
        ]
    finally:
        with contextlib.suppress(Exception):
            store.client.close()


def _unless_refused(
    store: RedisStore, code: str, what: str, check: Callable[[RedisStore], Finding]
) -> Finding:
    """A check whose reads the store refuses (a least-privilege ACL forbids INFO and CONFIG)
    is reported as not run: the store itself works, the setting could not be seen."""
    try:
        return check(store)
    except redis.exceptions.RedisError as exc:
        return Finding(
            Level.WARNING,
            code,
            f"{what} not checked: {classify(exc, client_secrets(store.client))}",
            "run the doctor as a user that may read INFO and CONFIG GET "
            "(idemtask.store.acl.acl_rules(doctor=True)), or check it on the server",
        )


def _eviction(store: RedisStore) -> Finding:
    policy = _text(store.client.info("memory").get("maxmemory_policy", "unknown"))
    if policy == "noeviction":
        return Finding(Level.OK, "store.eviction", "maxmemory-policy is noeviction")
    return Finding(
        Level.ERROR,
        "store.eviction",
        f"maxmemory-policy is {policy}: Redis may evict live records under memory pressure, "
        "and an evicted record lets a completed key run again",
        "CONFIG SET maxmemory-policy noeviction (or a dedicated Redis for idemtask)",
    )


def _persistence(store: RedisStore) -> Finding:
    aof = str(store.client.info("persistence").get("aof_enabled", 0)) == "1"
    try:
        save = _text(store.client.config_get("save").get("save", ""))
    except Exception:  # managed services often forbid CONFIG
        save = "unknown"
    if aof or save not in ("", "unknown"):
        detail = "appendonly yes" if aof else f"RDB snapshots (save {save!r})"
        return Finding(Level.OK, "store.persistence", f"persistence on: {detail}")
    return Finding(
        Level.WARNING,
        "store.persistence",
        f"no AOF and save {save!r}: a restart of the store's Redis forgets every record, so "
        "redelivered messages of completed tasks run again",
        "CONFIG SET appendonly yes (appendfsync everysec or always)",
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
