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
from idemtask.policy import MAX_COUNT, MAX_SECONDS, POLICY_OPTIONS, Policy, with_hints
from idemtask.redact import redact_url

ENV_PREFIX = "IDEMTASK_"
STORE_SETTINGS = frozenset({"redis_url", "key_prefix", "wait_replicas", "wait_timeout_ms"})
ALL_SETTINGS = STORE_SETTINGS | POLICY_OPTIONS
MEMORY_URL = "memory://"
MAX_MS = MAX_SECONDS * 1000
URL_SCHEMES = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+cluster://",
    "rediss+cluster://",
    "redis+sentinel://",
    MEMORY_URL,
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Where records live and the defaults every task's ``Policy`` starts from."""

    redis_url: str = MEMORY_URL
    key_prefix: str = "idemtask"
    defaults: Policy = field(default_factory=Policy)
    wait_replicas: int = 0  # replicas that must confirm each completion (Redis WAIT)
    wait_timeout_ms: int = 100  # how long a completion waits for them

    @property
    def uses_memory_store(self) -> bool:
        return self.redis_url == MEMORY_URL

    def __repr__(self) -> str:  # the URL's password must not reach a log or a traceback
        return (
            f"Settings(redis_url={redact_url(self.redis_url)!r}, key_prefix={self.key_prefix!r}, "
            f"defaults={self.defaults!r}, wait_replicas={self.wait_replicas!r}, "
            f"wait_timeout_ms={self.wait_timeout_ms!r})"
        )


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
    if not isinstance(redis_url, str) or not redis_url.startswith(URL_SCHEMES):
        raise ConfigurationError(
            "redis_url must be a redis://, rediss://, unix://, redis+cluster://, "
            f"rediss+cluster://, redis+sentinel:// or memory:// URL, got {_shown(redis_url)}"
        )
    if not isinstance(key_prefix, str) or not key_prefix or "{" in key_prefix:
        raise ConfigurationError(
            f"key_prefix must be a non-empty string without braces, got {key_prefix!r}"
        )
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        defaults=policy,
        wait_replicas=_count(store.get("wait_replicas", 0), "wait_replicas", minimum=0),
        # WAIT with a timeout of 0 blocks until the replicas answer, however long that takes.
        wait_timeout_ms=_count(
            store.get("wait_timeout_ms", 100), "wait_timeout_ms", minimum=1, maximum=MAX_MS
        ),
    )


def _shown(value: Any) -> str:
    """A setting's value for an error message: a URL without its secrets, else its type."""
    return repr(redact_url(value)) if isinstance(value, str) else f"a {type(value).__name__}"


def _count(value: Any, name: str, *, minimum: int, maximum: int = MAX_COUNT) -> int:
    """An int in ``[minimum, maximum]`` (environment values arrive as strings); Redis WAIT
    refuses larger numbers at the first completion."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        number = minimum - 1
    if isinstance(value, (bool, float)) or not minimum <= number <= maximum:
        raise ConfigurationError(
            f"{name} must be an integer >= {minimum} and <= {maximum}, got {value!r}"
        )
    return number


def _reject_unknown(layer: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(layer) - ALL_SETTINGS)
    if unknown:
        raise ConfigurationError(
            f"{source}: unknown idemtask setting(s) {with_hints(unknown, ALL_SETTINGS)}; "
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
    from django.conf import settings  # type: ignore[import-untyped, import-not-found, unused-ignore]

    if not settings.configured:
        return {}
    value = getattr(settings, "IDEMTASK", {})
    if not isinstance(value, Mapping):
        raise ConfigurationError("Django settings.IDEMTASK must be a dict")
    return value
