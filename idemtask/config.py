"""Settings resolution: explicit arguments > framework config > Django settings > environment.

Every layer is validated when it is read, so a typo fails at start-up, not at the first task.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from idemtask.errors import ConfigurationError
from idemtask.policy import POLICY_OPTIONS, Policy

ENV_PREFIX = "IDEMTASK_"
STORE_SETTINGS = frozenset({"redis_url", "key_prefix"})
ALL_SETTINGS = STORE_SETTINGS | POLICY_OPTIONS
MEMORY_URL = "memory://"


@dataclass(frozen=True, slots=True)
class Settings:
    """Where records live and the defaults every task's :class:`Policy` starts from."""

    redis_url: str = MEMORY_URL
    key_prefix: str = "idemtask"
    defaults: Policy = field(default_factory=Policy)

    @property
    def uses_memory_store(self) -> bool:
        return self.redis_url == MEMORY_URL


def resolve_settings(
    explicit: Mapping[str, Any] | None = None,
    framework: Mapping[str, Any] | None = None,
    *,
    framework_name: str = "framework config",
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the layers (highest first: explicit, framework, Django, environment)."""
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("environment", _from_environment(os.environ if environ is None else environ)),
        ("Django settings.IDEMTASK", _from_django()),
        (framework_name, framework or {}),
        ("arguments", explicit or {}),
    ]
    store: dict[str, Any] = {}
    policy = Policy()
    for source, layer in layers:
        _reject_unknown(layer, source)
        store.update({k: v for k, v in layer.items() if k in STORE_SETTINGS})
        policy = policy.with_options(
            {k: v for k, v in layer.items() if k in POLICY_OPTIONS}, source=source
        )
    redis_url = store.get("redis_url") or MEMORY_URL
    key_prefix = store.get("key_prefix", "idemtask")
    if not isinstance(redis_url, str) or not redis_url.startswith(
        ("redis://", "rediss://", "unix://", "redis+sentinel://", MEMORY_URL)
    ):
        raise ConfigurationError(
            f"redis_url must be a redis://, rediss://, unix:// or memory:// URL, got {redis_url!r}"
        )
    if not isinstance(key_prefix, str) or not key_prefix or "{" in key_prefix:
        raise ConfigurationError(
            f"key_prefix must be a non-empty string without braces, got {key_prefix!r}"
        )
    return Settings(redis_url=redis_url, key_prefix=key_prefix, defaults=policy)


def _reject_unknown(layer: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(layer) - ALL_SETTINGS)
    if unknown:
        raise ConfigurationError(
            f"{source}: unknown idemtask setting(s) {', '.join(unknown)}; "
            f"valid settings are {', '.join(sorted(ALL_SETTINGS))}"
        )


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    return {
        name[len(ENV_PREFIX) :].lower(): value
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX)
    }


def _from_django() -> Mapping[str, Any]:
    """Read ``settings.IDEMTASK`` only when Django is imported and configured."""
    if "django" not in sys.modules:
        return {}
    from django.conf import settings  # type: ignore[import-not-found, unused-ignore]

    if not settings.configured:
        return {}
    value = getattr(settings, "IDEMTASK", {})
    if not isinstance(value, Mapping):
        raise ConfigurationError("Django settings.IDEMTASK must be a dict")
    return value
