"""Per-task options with their defaults, validated once at declaration (shared by both adapters)."""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Iterable, Mapping
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
                f"{source}: unknown idemtask option(s) {with_hints(unknown, POLICY_OPTIONS)}; "
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
#: Every spelling an adapter accepts, by the policy option it sets: Dramatiq's Results owns
#: ``result_ttl``, so its actors spell idemtask's ``idempotency_result_ttl``.
OPTION_SPELLINGS: dict[str, str] = {
    **{name: name for name in POLICY_OPTIONS},
    "idempotency_result_ttl": "result_ttl",
}
_CLOSE = 0.8  # difflib ratio: catches one or two wrong letters, not other frameworks' options
_CHOICES: dict[str, tuple[str, ...]] = {
    "on_duplicate": get_args(OnDuplicate),
    "on_running": get_args(OnRunning),
    "on_store_error": get_args(OnStoreError),
}
_BOOLS = {"idempotent", "dedupe_enqueue", "validate_payload"}
_FLOATS = {"lease", "result_ttl", "reservation_ttl", "wait_timeout"}
_INTS = {"idempotency_key_version", "max_deliveries", "max_result_bytes"}
#: The longest duration any option may have: 100 years. Records keep ``now + duration`` in
#: milliseconds, which Redis's Lua must hold exactly (below 10**14 it prints no exponent).
MAX_SECONDS = 100 * 365 * 86_400
#: The largest count: a signed 64-bit integer, what Redis and the store's fields hold.
MAX_COUNT = 2**63 - 1
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
    if name in _FLOATS:
        return check_seconds(name, value, source=source)
    if name in _INTS:
        return _count(name, value, source)
    if name == "terminal_exceptions":
        return _exception_types(value, source)
    if name == "idempotency_key":
        return _key_spec(value, source)
    raise bad  # pragma: no cover - every option is handled above


def check_seconds(name: str, value: Any, *, source: str) -> float:
    """A duration in seconds: NaN and infinity pass every comparison or overflow later, and
    more than ``MAX_SECONDS`` overflows what the store keeps, so all are refused."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number) or abs(number) > MAX_SECONDS:
        raise ConfigurationError(
            f"{source}: invalid value {value!r} for option {name}: a finite number of seconds "
            f"<= {MAX_SECONDS} (100 years) is expected"
        )
    return number


def _count(name: str, value: Any, source: str) -> int:
    """A whole number (a float only when integral, as a JSON or YAML config may give it)."""
    number: int | None = None
    if isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            number = int(value)
        except ValueError:
            number = None
    if number is None or abs(number) > MAX_COUNT:
        raise ConfigurationError(
            f"{source}: invalid value {value!r} for option {name}: a whole number "
            f"<= {MAX_COUNT} is expected"
        )
    return number


def close_match(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``name`` is most likely a misspelling of, if any is close enough."""
    return _close_match(name.lower(), tuple(sorted(candidates)))


@functools.lru_cache(maxsize=4096)
def _close_match(name: str, candidates: tuple[str, ...]) -> str | None:
    # Cached: every task class of an app repeats the same attribute names (app, name, run).
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=_CLOSE)
    return found[0] if found else None


def with_hints(names: Iterable[str], candidates: Iterable[str]) -> str:
    """``names`` for an error message, each followed by its did-you-mean when there is one."""
    pool = sorted(candidates)
    parts = []
    for name in names:
        match = close_match(name, pool)
        parts.append(f"{name} (did you mean {match}?)" if match else name)
    return ", ".join(parts)


def check_option_names(
    names: Iterable[str], *, source: str, spellings: Mapping[str, str] | None = None
) -> None:
    """Refuse names that look like an idemtask option but are none: a misspelt option would
    otherwise be ignored and its default used (for ``idempotency_key``: every argument).

    ``spellings`` maps the names this adapter accepts to policy options (default: the policy
    options themselves). A name close to any adapter's spelling is refused with the spelling
    this adapter accepts; names unlike any option (other frameworks' options) pass.
    """
    accepted = dict(spellings) if spellings is not None else {n: n for n in POLICY_OPTIONS}
    known = {**OPTION_SPELLINGS, **accepted}
    mine = {option: spelling for spelling, option in accepted.items()}
    problems = []
    for name in sorted(set(names) - set(accepted)):
        match = None if name.startswith("_") else close_match(name, known)
        if match is not None:
            suggestion = mine.get(known[match])
            hint = f"did you mean {suggestion}?" if suggestion else f"{match} is not an option here"
            problems.append(f"{name} ({hint})")
    if problems:
        raise ConfigurationError(
            f"{source}: unknown idemtask option(s) {', '.join(problems)}; valid options are "
            f"{', '.join(sorted(accepted))} (a name not meant for idemtask: rename it)"
        )


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
