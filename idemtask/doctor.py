"""Store checks shared by the Celery and Dramatiq doctors."""

from __future__ import annotations

from typing import Any

from idemtask.config import Settings
from idemtask.errors import StoreUnavailable
from idemtask.findings import Finding, Level
from idemtask.store.redis import RedisStore


def check_store(settings: Settings, *, real_broker: bool = True) -> list[Finding]:
    """Is the store shared, reachable, safe from eviction, and persistent?"""
    if settings.uses_memory_store:
        if real_broker:
            return [
                Finding(
                    Level.ERROR,
                    "store.shared",
                    "the store is the in-process MemoryStore: workers in other processes "
                    "do not see each other's records",
                    "set redis_url (app.conf.idemtask, IdempotencyMiddleware(redis_url=...), "
                    "Django settings.IDEMTASK or IDEMTASK_REDIS_URL)",
                )
            ]
        return [Finding(Level.OK, "store.shared", "MemoryStore for an in-process broker")]
    store = RedisStore.from_url(settings.redis_url, prefix=settings.key_prefix)
    try:
        store.ping()
    except StoreUnavailable as exc:
        return [
            Finding(
                Level.ERROR,
                "store.reachable",
                f"cannot reach the store at {settings.redis_url}: {exc}",
                "start Redis or fix redis_url",
            )
        ]
    findings = [Finding(Level.OK, "store.reachable", f"store at {settings.redis_url} answers")]
    try:
        config = {
            _text(name): _text(value)
            for option in ("maxmemory-policy", "appendonly", "save")
            for name, value in store.client.config_get(option).items()
        }
    except Exception as exc:  # managed services often forbid CONFIG
        return [
            *findings,
            Finding(
                Level.WARNING,
                "store.config",
                f"cannot read the store's configuration ({exc})",
                "check by hand that maxmemory-policy is noeviction and persistence is on",
            ),
        ]
    policy = config.get("maxmemory-policy", "")
    if policy == "noeviction":
        findings.append(Finding(Level.OK, "store.eviction", "maxmemory-policy is noeviction"))
    else:
        findings.append(
            Finding(
                Level.ERROR,
                "store.eviction",
                f"maxmemory-policy is {policy}: Redis may evict live records under memory "
                "pressure, and an evicted record lets a duplicate run",
                "CONFIG SET maxmemory-policy noeviction (or a dedicated Redis for idemtask)",
            )
        )
    appendonly, save = config.get("appendonly", "no"), config.get("save", "")
    if appendonly == "yes" or save.strip():
        how = "appendonly" if appendonly == "yes" else f"RDB snapshots ({save})"
        findings.append(Finding(Level.OK, "store.persistence", f"persistence on: {how}"))
    else:
        findings.append(
            Finding(
                Level.WARNING,
                "store.persistence",
                "persistence is off: a Redis restart forgets every record, so redelivered "
                "messages of completed tasks run again",
                "CONFIG SET appendonly yes",
            )
        )
    return findings


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
