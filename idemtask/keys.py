"""Idempotency keys: bind a call to its signature, encode it canonically, digest it.

One logical call must give one key in every process that sees it: the caller, the worker, a
producer in another language that sends JSON, a redelivery after a deploy. So the encoding is
explicit and type-tagged instead of resting on ``repr()``, ``hash()`` or pickle, which change
with the process, the hash seed or the Python version. Each encoded value is a one-byte tag,
a four-byte length and a body, so user data can never be read as a tag or run into a
neighbouring value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import inspect
import math
import struct
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from types import MethodType
from typing import Any, TypeAlias

from idemtask.errors import ConfigurationError, KeyDerivationError

__all__ = [
    "KEY_SCHEMA_VERSION",
    "DerivedKey",
    "KeySpec",
    "bind_arguments",
    "canonical_bytes",
    "derive_key",
    "explicit_key",
    "validate_key_spec",
]

#: Bumped whenever the encoding or the digest input changes: records keyed by an older
#: schema then stop matching instead of matching the wrong calls.
KEY_SCHEMA_VERSION = 1

#: ``None``: every bound argument; a tuple: only the named arguments; a callable: called
#: with the call's own ``*args, **kwargs``, its return value is the key material.
KeySpec: TypeAlias = tuple[str, ...] | Callable[..., Any] | None


@dataclass(frozen=True, slots=True)
class DerivedKey:
    """A record's identity plus a digest of the whole call, to catch a key reused for another."""

    key: str
    fingerprint: str


# ---------------------------------------------------------------------------------------------
# Canonical encoding

_HEAD = struct.Struct(">cI").pack
_LENGTH = struct.Struct(">I").pack
_DATETIME = struct.Struct(">HBBBBBI").pack
_DATE = struct.Struct(">HBB").pack
_TIME = struct.Struct(">BBBI").pack
_MICROSECOND = timedelta(microseconds=1)
_MAX_REPR = 60

_NONE = _HEAD(b"N", 0)
_TRUE = _HEAD(b"T", 0)
_FALSE = _HEAD(b"F", 0)


class _Unencodable(Exception):
    """Raised inside the encoder; containers add their path segment on the way out."""

    def __init__(self, message: str, segments: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.segments: list[str] = segments if segments is not None else []


def _type_name(value: object) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{_type_name(value)}>"
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _key_segment(key: object) -> str:
    if type(key) is str and key.isidentifier():
        return f".{key}"
    return f"[{_short_repr(key)}]"


def _encode(value: object) -> bytes:
    encoder = _ENCODERS.get(type(value))
    if encoder is not None:
        return encoder(value)
    return _encode_other(value)


def _encode_none(value: None) -> bytes:
    return _NONE


def _encode_bool(value: bool) -> bytes:
    return _TRUE if value else _FALSE


def _encode_int(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
    return _HEAD(b"i", len(body)) + body


def _encode_float(value: float) -> bytes:
    if not math.isfinite(value):
        raise _Unencodable(
            f"cannot encode float {value!r}: NaN never equals itself and infinity has no JSON form"
        )
    if value.is_integer():
        # A JSON producer in another language sends 1 for 1.0: both must give one key.
        return _encode_int(int(value))
    body = repr(value).encode("ascii")
    return _HEAD(b"f", len(body)) + body


def _encode_str(value: str) -> bytes:
    try:
        body = value.encode()
    except UnicodeEncodeError:
        # JSON writes surrogates as escapes and reads an escaped pair back as one character:
        # "\ud83d\ude00" arrives as "\U0001f600". Pair them here too; lone ones stay as they are.
        paired = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
        body = paired.encode("utf-8", "surrogatepass")
    return _HEAD(b"s", len(body)) + body


def _encode_bytes(value: bytes | bytearray | memoryview) -> bytes:
    body = value.tobytes() if isinstance(value, memoryview) else bytes(value)
    return _HEAD(b"b", len(body)) + body


def _encode_sequence(value: Sequence[Any]) -> bytes:
    parts = []
    lookup = _ENCODERS.get  # containers dispatch inline: this is the hot loop
    for index, item in enumerate(value):
        try:
            encoder = lookup(type(item))
            parts.append(encoder(item) if encoder is not None else _encode_other(item))
        except _Unencodable as err:
            err.segments.append(f"[{index}]")
            raise
    body = b"".join(parts)
    return _HEAD(b"l", len(body)) + body


_NULL_KEY = _encode_str("null")
_TRUE_KEY = _encode_str("true")
_FALSE_KEY = _encode_str("false")
# kombu's JSON reads a mapping with exactly these two keys back as a tagged value.
_KOMBU_TAGGED = frozenset({_encode_str("__type__"), _encode_str("__value__")})


def _encode_mapping_key(key: object) -> bytes:
    """A mapping key as JSON writes it, so ``{1: x}`` keys like the ``{"1": x}`` a worker reads.

    JSON object keys are strings: ``None``, ``bool``, ``int`` and ``float`` keys (and enum
    members with such values) become the string JSON writes for them. Other hashable types
    (tuples, dates, ``Decimal``...) keep their tagged encoding: JSON refuses them at send, and
    pickle and YAML carry them as they are.
    """
    if isinstance(key, enum.Enum):
        return _encode_mapping_key(key.value)
    if isinstance(key, str):
        return _encode_str(str.__str__(key))
    if key is None:
        return _NULL_KEY
    if key is True:
        return _TRUE_KEY
    if key is False:
        return _FALSE_KEY
    if isinstance(key, int):
        try:
            return _encode_str(int.__repr__(key))
        except ValueError:  # more digits than sys.get_int_max_str_digits(): JSON fails too
            raise _Unencodable("int has too many digits to be written as a JSON key") from None
    if isinstance(key, float):
        if not math.isfinite(key):
            raise _Unencodable(
                f"float {key!r}: NaN never equals itself and infinity has no JSON form"
            )
        return _encode_str(float.__repr__(key))
    return _encode(key)


def _collision(value: Mapping[Any, Any]) -> _Unencodable:
    seen: dict[bytes, object] = {}
    for key in value:
        encoded_key = _encode_mapping_key(key)
        if encoded_key in seen:
            return _Unencodable(
                f"mapping keys {_short_repr(seen[encoded_key])} and {_short_repr(key)} are one "
                "key once serialized to JSON, which keeps only one of their values; "
                "use distinct keys",
                [_key_segment(key)],
            )
        seen[encoded_key] = key
    raise AssertionError("no two keys collide")  # pragma: no cover


def _encode_mapping(value: Mapping[Any, Any]) -> bytes:
    keys = []
    pairs = []
    lookup = _ENCODERS.get
    for key, item in value.items():
        try:
            encoded_key = _encode_str(key) if type(key) is str else _encode_mapping_key(key)
        except _Unencodable as err:
            raise _Unencodable(
                f"cannot use this value as a mapping key: {err.message}", [_key_segment(key)]
            ) from None
        keys.append(encoded_key)
        try:
            encoder = lookup(type(item))
            pairs.append(
                encoded_key + (encoder(item) if encoder is not None else _encode_other(item))
            )
        except _Unencodable as err:
            err.segments.append(_key_segment(key))
            raise
    if len(set(keys)) != len(keys):
        raise _collision(value)
    if len(keys) == 2 and _KOMBU_TAGGED.issuperset(keys):
        raise _Unencodable(
            "a mapping whose only keys are '__type__' and '__value__' is read back by "
            "Celery's JSON serializer (kombu) as another type, not as this mapping; "
            "add or rename a key"
        )
    # An encoding's tag and length fix its size, so no key's encoding is a prefix of another's:
    # with no two keys alike, sorting whole pairs orders them by key.
    pairs.sort()
    body = b"".join(pairs)
    return _HEAD(b"d", len(body)) + body


def _encode_set(value: set[Any] | frozenset[Any]) -> bytes:
    items = set()
    for item in value:
        try:
            items.add(_encode(item))
        except _Unencodable as err:
            err.segments.append(f"{{{_short_repr(item)}}}")
            raise
    body = b"".join(sorted(items))
    return _HEAD(b"S", len(body)) + body


def _encode_decimal(value: Decimal) -> bytes:
    if not value.is_finite():
        raise _Unencodable(
            f"cannot encode Decimal {str(value)!r}: NaN never equals itself and infinity "
            "has no JSON form"
        )
    # Strip trailing zeros by hand: Decimal.normalize() rounds to the context's precision.
    sign, digit_tuple, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite values always have an int exponent
    digits = "".join(map(str, digit_tuple))
    stripped = digits.rstrip("0")
    if not stripped:
        body = b"0"
    else:
        exponent += len(digits) - len(stripped)
        body = f"{'-' if sign else ''}{stripped}e{exponent}".encode("ascii")
    return _HEAD(b"D", len(body)) + body


def _encode_uuid(value: uuid.UUID) -> bytes:
    return _HEAD(b"u", 16) + value.bytes


def _encode_datetime(value: datetime) -> bytes:
    offset = value.utcoffset()
    if offset is None:
        tag, moment = b"n", value
    else:
        try:
            moment = value.replace(tzinfo=None) - offset
        except OverflowError:
            raise _Unencodable(f"datetime {value.isoformat()} is out of range in UTC") from None
        tag = b"z"
    body = _DATETIME(
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
    )
    return _HEAD(tag, len(body)) + body


def _encode_date(value: date) -> bytes:
    body = _DATE(value.year, value.month, value.day)
    return _HEAD(b"a", len(body)) + body


def _encode_time(value: time) -> bytes:
    offset = value.utcoffset()
    if offset is None:
        body = _TIME(value.hour, value.minute, value.second, value.microsecond)
        return _HEAD(b"t", len(body)) + body
    # Aware times compare by their UTC instant, which can fall outside 0:00-24:00.
    since_midnight = ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000
    micros = since_midnight + value.microsecond - offset // _MICROSECOND
    body = _encode_int(micros)
    return _HEAD(b"w", len(body)) + body


def _encode_timedelta(value: timedelta) -> bytes:
    body = _encode_int(value // _MICROSECOND)
    return _HEAD(b"e", len(body)) + body


def _encode_other(value: object) -> bytes:
    """Subclasses and duck-typed values, after the exact-type table missed."""
    if isinstance(value, enum.Enum):
        # A serializer turns Color.RED into "red": the caller and the worker must agree.
        return _encode(value.value)
    if isinstance(value, int):
        return _encode_int(int.__index__(value))
    if isinstance(value, float):
        return _encode_float(float.__float__(value))
    if isinstance(value, str):
        return _encode_str(str.__str__(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return _encode_bytes(value)
    if isinstance(value, Mapping):
        return _encode_mapping(value)
    if isinstance(value, list | tuple):
        return _encode_sequence(value)
    if isinstance(value, set | frozenset):
        return _encode_set(value)
    if isinstance(value, datetime):
        return _encode_datetime(value)
    if isinstance(value, date):
        return _encode_date(value)
    if isinstance(value, time):
        return _encode_time(value)
    if isinstance(value, timedelta):
        return _encode_timedelta(value)
    if isinstance(value, Decimal):
        return _encode_decimal(value)
    if isinstance(value, uuid.UUID):
        return _encode_uuid(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Not asdict(): walking the fields ourselves keeps the path of a bad nested value.
        fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        return _encode_mapping(fields)
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and not isinstance(value, type):
        try:
            dumped = model_dump(mode="python")
        except Exception as err:
            raise _Unencodable(f"model_dump() raised {type(err).__name__}: {err}") from err
        if not isinstance(dumped, Mapping):
            raise _Unencodable(f"model_dump() returned {_type_name(dumped)}, not a mapping")
        return _encode_mapping(dumped)
    raise _Unencodable(f"cannot encode value of type {_type_name(value)}")


_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    type(None): _encode_none,
    bool: _encode_bool,
    int: _encode_int,
    float: _encode_float,
    str: _encode_str,
    bytes: _encode_bytes,
    bytearray: _encode_bytes,
    memoryview: _encode_bytes,
    list: _encode_sequence,
    tuple: _encode_sequence,
    dict: _encode_mapping,
    set: _encode_set,
    frozenset: _encode_set,
    Decimal: _encode_decimal,
    uuid.UUID: _encode_uuid,
    datetime: _encode_datetime,
    date: _encode_date,
    time: _encode_time,
    timedelta: _encode_timedelta,
}


def _join_path(root: str, segments: list[str]) -> str:
    tail = "".join(reversed(segments))
    if not root and tail.startswith("."):
        tail = tail[1:]
    return root + tail


#: What to do about a value that cannot be encoded, by what it was encoded for.
KEY_HINT = "pass a JSON-like value or set idempotency_key"
NAMED_HINT = (
    "the idempotency_key names this argument: pass a JSON-like value, or key by a function "
    "that returns one from it"
)
FINGERPRINT_HINT = (
    "validate_payload fingerprints every argument, also those the idempotency_key leaves "
    "out: pass a JSON-like value or set validate_payload=False"
)
EXPLICIT_HINT = (
    "validate_payload fingerprints every argument, even under an explicit idempotency_key: "
    "pass a JSON-like value or set validate_payload=False"
)
FUNCTION_HINT = "the idempotency_key function must return a JSON-like value"


def canonical_bytes(value: object, path: str = "", *, hint: str = "") -> bytes:
    """Encode ``value`` so that equal JSON-like values give equal bytes in any process.

    ``path`` names ``value`` in error messages; nested values extend it (``order.items[3]``).
    ``hint`` ends the message of a value that cannot be encoded: what the caller can do.
    """
    try:
        return _encode(value)
    except _Unencodable as err:
        message, where, cause = err.message, _join_path(path, err.segments), err.__cause__
    except RecursionError:
        message, where, cause = "value is nested too deeply or contains itself", path, None
    raise KeyDerivationError(f"{message}; {hint}" if hint else message, where) from cause


# ---------------------------------------------------------------------------------------------
# Binding a call to its signature

_EMPTY = inspect.Parameter.empty
_SIMPLE_KINDS = frozenset({inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY})


class _Binder:
    """A signature plus, when it has no ``*args``/``**kwargs``/``/``, a fast binding plan.

    ``Signature.bind`` costs several microseconds per call; for plain signatures a dict
    built by hand gives the same result, and anything unusual still goes through ``bind``.
    """

    __slots__ = ("defaults", "names", "positional", "signature")

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        parameters = list(signature.parameters.values())
        self.names: tuple[str, ...] | None = None
        self.positional: tuple[str, ...] = ()
        self.defaults: tuple[tuple[str, Any], ...] = ()
        if all(parameter.kind in _SIMPLE_KINDS for parameter in parameters):
            self.names = tuple(parameter.name for parameter in parameters)
            self.positional = tuple(
                parameter.name
                for parameter in parameters
                if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            )
            self.defaults = tuple((parameter.name, parameter.default) for parameter in parameters)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        names = self.names
        if names is not None and len(args) <= len(self.positional):
            if not kwargs and len(args) == len(names):
                return dict(zip(names, args, strict=True))
            given = dict(zip(self.positional, args, strict=False))
            for name, value in kwargs.items():
                if name in given or name not in names:
                    break  # a duplicate or unknown keyword: let bind() word the error
                given[name] = value
            else:
                arguments: dict[str, Any] = {}
                for name, default in self.defaults:
                    if name in given:
                        arguments[name] = given[name]
                    elif default is not _EMPTY:
                        arguments[name] = default
                    else:
                        break  # a required argument is missing
                else:
                    return arguments
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)


_plain_binders: weakref.WeakKeyDictionary[Any, _Binder | None] = weakref.WeakKeyDictionary()
_method_binders: weakref.WeakKeyDictionary[Any, _Binder | None] = weakref.WeakKeyDictionary()


def _read_binder(fn: Callable[..., Any]) -> _Binder | None:
    try:
        return _Binder(inspect.signature(fn))
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return None


def _binder(fn: Callable[..., Any]) -> _Binder | None:
    """``inspect.signature`` is slow; cache it without keeping task functions alive."""
    # A bound method is a new object on every attribute access: cache under its function.
    if isinstance(fn, MethodType):
        cache, owner = _method_binders, fn.__func__
    else:
        cache, owner = _plain_binders, fn
    try:
        return cache[owner]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable or not hashable: read it every time
        return _read_binder(fn)
    binder = _read_binder(fn)
    with contextlib.suppress(TypeError):
        cache[owner] = binder
    return binder


def bind_arguments(
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    task_name: str,
) -> dict[str, Any]:
    """Name every argument and fill in defaults, so ``f(1)`` and ``f(x=1, y=2)`` agree.

    Without a readable signature the call is kept as ``{"args": [...], "kwargs": {...}}``.
    """
    binder = _binder(fn)
    if binder is None:
        return {"args": list(args), "kwargs": dict(kwargs)}
    try:
        return binder.bind(args, kwargs)
    except TypeError as err:
        raise KeyDerivationError(
            f"arguments do not match the signature of {task_name}: {err}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Key specs and digests


def _parameter_names(fn: Callable[..., Any] | None) -> list[str] | None:
    if fn is None:
        return None
    binder = _binder(fn)
    return None if binder is None else list(binder.signature.parameters)


def _check_spec_shape(spec: object, task_name: str) -> None:
    """Raise for anything but ``None``, a non-empty tuple of names or a callable."""
    if spec is None or callable(spec):
        return
    if isinstance(spec, str):
        raise ConfigurationError(
            f"idempotency_key of {task_name} must be a tuple of argument names, not a string: "
            f"write ({spec!r},)"
        )
    if isinstance(spec, list) and all(isinstance(name, str) for name in spec):
        raise ConfigurationError(
            f"idempotency_key of {task_name} must be a tuple, not a list: write {tuple(spec)!r}"
        )
    if not isinstance(spec, tuple):
        raise ConfigurationError(
            f"idempotency_key of {task_name} must be None, a tuple of argument names or a "
            f"callable, not {_type_name(spec)}"
        )
    if not spec:
        raise ConfigurationError(
            f"idempotency_key of {task_name} is an empty tuple, which gives every call the same "
            "key; name at least one argument, or pass a callable that returns a constant if one "
            "key for all calls is intended"
        )
    for name in spec:
        if not isinstance(name, str):
            raise ConfigurationError(
                f"idempotency_key of {task_name} must name arguments as strings, got {name!r}"
            )


def validate_key_spec(fn: Callable[..., Any] | None, spec: KeySpec, *, task_name: str) -> None:
    """Reject a bad ``idempotency_key`` when the task is declared, not on its first call.

    Tuple names are checked against ``fn``'s parameters when its signature can be read.
    """
    _check_spec_shape(spec, task_name)
    if not isinstance(spec, tuple):
        return
    names = _parameter_names(fn)
    if names is None:
        return
    for name in spec:
        if name not in names:
            valid = ", ".join(names) or "(none)"
            raise ConfigurationError(
                f"idempotency_key of {task_name} names {name!r}, which is not a parameter "
                f"of {task_name}; its parameters are: {valid}"
            )


_KEY_PERSON = b"idemtask.key"
_FINGERPRINT_PERSON = b"idemtask.payload"
_SCHEMA = str(KEY_SCHEMA_VERSION).encode("ascii")
_DERIVED = b"derived"
_EXPLICIT = b"explicit"


def _frame(*fields: bytes) -> bytes:
    # Every field is length-prefixed, so ("ab", "c") and ("a", "bc") cannot collide.
    return b"".join([_LENGTH(len(field)) + field for field in fields])


@functools.lru_cache(maxsize=4096)
def _key_prefix(kind: bytes, task_name: str, version: int) -> bytes:
    """The framed fields before the key material; they repeat on every call of a task."""
    return _frame(_SCHEMA, kind, task_name.encode("utf-8"), str(version).encode("ascii"))


@functools.lru_cache(maxsize=4096)
def _fingerprint_prefix(task_name: str) -> bytes:
    return _frame(_SCHEMA, task_name.encode("utf-8"))


def _key_digest(kind: bytes, task_name: str, version: int, material: bytes) -> str:
    if type(version) is not int:
        raise ConfigurationError(
            f"idempotency_key_version of {task_name} must be an int, not {_type_name(version)}"
        )
    framed = _key_prefix(kind, task_name, version) + _LENGTH(len(material)) + material
    return hashlib.blake2b(framed, digest_size=16, person=_KEY_PERSON).hexdigest()


def _fingerprint(task_name: str, payload: bytes) -> str:
    framed = _fingerprint_prefix(task_name) + _LENGTH(len(payload)) + payload
    return hashlib.blake2b(framed, digest_size=16, person=_FINGERPRINT_PERSON).hexdigest()


def _callable_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else _type_name(fn)


def derive_key(
    task_name: str,
    arguments: Mapping[str, Any],
    *,
    spec: KeySpec = None,
    version: int = 1,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    validate_payload: bool = True,
) -> DerivedKey:
    """Key a call from its bound ``arguments`` (see ``bind_arguments``).

    ``args``/``kwargs`` are the call as made; only a callable ``spec`` uses them. Without
    ``validate_payload`` the arguments a ``spec`` leaves out are not encoded (nor need to
    be), and the fingerprint is empty.
    """
    _check_spec_shape(spec, task_name)
    if spec is None:
        material = canonical_bytes(arguments, hint=KEY_HINT)
        payload: bytes | None = material
    else:
        material = _spec_material(task_name, arguments, spec, args, kwargs or {})
        payload = canonical_bytes(arguments, hint=FINGERPRINT_HINT) if validate_payload else None
    return DerivedKey(
        key=_key_digest(_DERIVED, task_name, version, material),
        fingerprint="" if payload is None else _fingerprint(task_name, payload),
    )


def _spec_material(
    task_name: str,
    arguments: Mapping[str, Any],
    spec: tuple[str, ...] | Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> bytes:
    """The key material of a tuple of argument names or of a key function."""
    if isinstance(spec, tuple):
        subset = {}
        for name in spec:
            try:
                subset[name] = arguments[name]
            except KeyError:
                raise KeyDerivationError(
                    f"not among the call's arguments, but the idempotency key of {task_name} "
                    "names it",
                    name,
                ) from None
        return canonical_bytes(subset, hint=NAMED_HINT)
    function_name = _callable_name(spec)
    try:
        value = spec(*args, **kwargs)
    except Exception as err:
        raise KeyDerivationError(
            f"idempotency key function {function_name} raised {type(err).__name__}: {err}"
        ) from err
    return canonical_bytes(value, f"{function_name}()", hint=FUNCTION_HINT)


def explicit_key(
    task_name: str,
    key: str,
    *,
    version: int = 1,
    arguments: Mapping[str, Any] | None = None,
) -> DerivedKey:
    """Key a call by a caller-given string, scoped to the task and the key version.

    The fingerprint covers ``arguments`` when given, so reusing the key for another payload
    is caught; without them it is ``""`` and nothing is compared.
    """
    if not isinstance(key, str) or not key:
        raise KeyDerivationError(
            f"an explicit idempotency key must be a non-empty string, got {_short_repr(key)}"
        )
    material = key.encode("utf-8", "surrogatepass")
    fingerprint = (
        ""
        if arguments is None
        else _fingerprint(task_name, canonical_bytes(arguments, hint=EXPLICIT_HINT))
    )
    return DerivedKey(
        key=_key_digest(_EXPLICIT, task_name, version, material),
        fingerprint=fingerprint,
    )
