"""Per-task options with their defaults, validated once at declaration (shared by both adapters)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

from idemtask.errors import ConfigurationError
from idemtask.keys import KeySpec

OnDuplicate = Literal["return_existing", "raise", "enqueue"]
OnRunning = Literal["defer", "wait", "raise", "drop"]
OnStoreError = Literal["defer", "run", "raise"]


@dataclass(frozen=True, slots=True)
class Policy:
    """How one task is guarded. Durations are seconds; every one has a global default."""

    idempotent: bool = True
    idempotency_key: KeySpec = None
    idempotency_key_version: int = 1
    dedupe_enqueue: bool = True
    on_duplicate: OnDuplicate = "return_existing"
    on_running: OnRunning = "defer"
    on_store_error: OnStoreError = "defer"
    lease: float = 60.0
    result_ttl: float = 86_400.0
    reservation_ttl: float = 3_600.0
    wait_timeout: float = 30.0
    terminal_exceptions: tuple[type[BaseException], ...] = ()
    max_deliveries: int = 5
    validate_payload: bool = True
    max_result_bytes: int = 1_048_576

    @property
    def lease_ms(self) -> int:
        return int(self.lease * 1000)

    @property
    def result_ttl_ms(self) -> int:
        return int(self.result_ttl * 1000)

    @property
    def reservation_ms(self) -> int:
        return int(self.reservation_ttl * 1000)

    def with_options(self, options: Mapping[str, Any], *, source: str) -> Policy:
        """A copy with ``options`` applied; unknown names or bad values raise ConfigurationError.

        ``source`` names where the options came from (a task, a settings object) in errors.
        """
        unknown = sorted(set(options) - POLICY_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"{source}: unknown idemtask option(s) {', '.join(unknown)}; "
                f"valid options are {', '.join(sorted(POLICY_OPTIONS))}"
            )
        values = {name: _coerce(name, value, source) for name, value in options.items()}
        policy = replace(self, **values)
        policy._check(source)
        return policy

    def _check(self, source: str) -> None:
        if self.lease <= 0:
            raise ConfigurationError(f"{source}: lease must be > 0 seconds, got {self.lease}")
        if self.result_ttl <= 0:
            # Any positive value is safe with any lease: a record lives the result TTL past
            # the end of every lease on it (docs/architecture.md, "Record lifetime").
            raise ConfigurationError(
                f"{source}: result_ttl must be > 0 seconds, got {self.result_ttl}"
            )
        if self.reservation_ttl <= 0 or self.wait_timeout < 0:
            raise ConfigurationError(
                f"{source}: reservation_ttl must be > 0 and wait_timeout >= 0 seconds"
            )
        if self.max_deliveries < 1:
            raise ConfigurationError(f"{source}: max_deliveries must be >= 1")
        if self.max_result_bytes < 0:
            raise ConfigurationError(f"{source}: max_result_bytes must be >= 0")
        if self.idempotency_key_version < 1:
            raise ConfigurationError(f"{source}: idempotency_key_version must be >= 1")


POLICY_OPTIONS = frozenset(f.name for f in fields(Policy))
_CHOICES: dict[str, tuple[str, ...]] = {
    "on_duplicate": get_args(OnDuplicate),
    "on_running": get_args(OnRunning),
    "on_store_error": get_args(OnStoreError),
}
_BOOLS = {"idempotent", "dedupe_enqueue", "validate_payload"}
_FLOATS = {"lease", "result_ttl", "reservation_ttl", "wait_timeout"}
_INTS = {"idempotency_key_version", "max_deliveries", "max_result_bytes"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Accept typed values and the strings environment variables carry."""
    bad = ConfigurationError(f"{source}: invalid value {value!r} for option {name}")
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ConfigurationError(
                f"{source}: {name} must be one of {', '.join(_CHOICES[name])}, got {value!r}"
            )
        return value
    if name in _BOOLS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if name in _FLOATS or name in _INTS:
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value) if name in _FLOATS else int(value)
        except (TypeError, ValueError):
            raise bad from None
        return number
    if name == "terminal_exceptions":
        return _exception_types(value, source)
    if name == "idempotency_key":
        return _key_spec(value, source)
    raise bad  # pragma: no cover - every option is handled above


def _exception_types(value: Any, source: str) -> tuple[type[BaseException], ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    items = value if isinstance(value, (tuple, list)) else (value,)
    resolved: list[type[BaseException]] = []
    for item in items:
        if isinstance(item, str):
            item = _import_dotted(item, source)
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ConfigurationError(
                f"{source}: terminal_exceptions must list exception classes, got {item!r}"
            )
        resolved.append(item)
    return tuple(resolved)


def _key_spec(value: Any, source: str) -> KeySpec:
    if value is None or callable(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigurationError(
        f"{source}: idempotency_key must be None, a tuple of argument names or a callable, "
        f"got {value!r}"
    )


def _import_dotted(path: str, source: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        module = __import__(module_name, fromlist=[attr])
        return getattr(module, attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigurationError(f"{source}: cannot import {path!r}") from None
