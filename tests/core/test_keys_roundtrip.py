"""A worker that re-derives a key from the decoded message must find the caller's key.

Every accepted argument value ``v`` must key like ``decode(encode(v))`` through each
serializer a user can configure (Celery's ``json``, ``pickle`` and ``yaml`` through kombu;
Dramatiq's ``JSONEncoder`` and ``PickleEncoder``), or be refused at enqueue with a
``KeyDerivationError`` naming its path. A serializer that cannot encode ``v`` refuses the
message at send, so nothing reaches a worker and no key needs to agree.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import uuid
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import dramatiq
import pydantic
import pytest
from dramatiq.encoder import JSONEncoder, PickleEncoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.exceptions import DecodeError
from kombu.serialization import dumps, loads

from idemtask.errors import KeyDerivationError
from idemtask.keys import DerivedKey, bind_arguments, derive_key

# ---------------------------------------------------------------------------------------------
# The serializers, as the frameworks call them


class Refused(Exception):
    """The serializer cannot encode the message: the send fails and nothing is published."""


def _kombu(name: str) -> Callable[[object], object]:
    def round_trip(value: object) -> object:
        # Celery's protocol 2 body: (args, kwargs, embed).
        try:
            content_type, encoding, data = dumps(((value,), {}, {}), serializer=name)
        except Exception as err:
            raise Refused(str(err)) from err
        args, _kwargs, _embed = loads(data, content_type, encoding, accept=[content_type])
        return args[0]

    return round_trip


def _dramatiq(encoder: dramatiq.Encoder) -> Callable[[object], object]:
    def round_trip(value: object) -> object:
        message = dramatiq.Message(
            queue_name="default", actor_name="task", args=(value,), kwargs={}, options={}
        )
        try:
            data = encoder.encode(message.asdict())
        except Exception as err:
            raise Refused(str(err)) from err
        return encoder.decode(data)["args"][0]

    return round_trip


SERIALIZERS: dict[str, Callable[[object], object]] = {
    "celery-json": _kombu("json"),
    "celery-pickle": _kombu("pickle"),
    "celery-yaml": _kombu("yaml"),
    "dramatiq-json": _dramatiq(JSONEncoder()),
    "dramatiq-pickle": _dramatiq(PickleEncoder()),
}
JSON_SERIALIZERS = ("celery-json", "dramatiq-json")


def task(value: object) -> None:
    """The task whose single argument carries the value under test."""


def key_of(value: object) -> DerivedKey:
    """The key as the caller derives it at enqueue, and the worker from a decoded message."""
    arguments = bind_arguments(task, (value,), {}, task_name="task")
    return derive_key("task", arguments)


def worker_key(serializer: str, value: object) -> DerivedKey | None:
    """The key the worker derives, or None when the message never reaches a task."""
    try:
        decoded = SERIALIZERS[serializer](value)
    except Refused:
        return None
    except DecodeError:
        # PyYAML writes a tuple as a list, then cannot read it back as a mapping key or a set
        # member, nor an offset with seconds: the worker rejects the message, nothing runs.
        if serializer == "celery-yaml":
            return None
        raise
    return key_of(decoded)


# ---------------------------------------------------------------------------------------------
# Mapping keys: the reported case

json_key_types = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
)
json_leaves = st.none() | st.booleans() | st.integers() | st.text(max_size=4)
keyed_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(json_key_types, children, max_size=4)
    ),
    max_leaves=12,
)


def json_key(key: object) -> str:
    """The string JSON writes for a mapping key."""
    written = json.dumps({key: 0})
    return str(next(iter(json.loads(written))))


def has_colliding_keys(value: object) -> bool:
    if isinstance(value, dict):
        if len({json_key(key) for key in value}) < len(value):
            return True
        return any(has_colliding_keys(item) for item in value.values())
    if isinstance(value, list):
        return any(has_colliding_keys(item) for item in value)
    return False


@pytest.mark.parametrize("serializer", JSON_SERIALIZERS)
@given(value=keyed_values)
@settings(deadline=None)
def test_non_string_mapping_keys_key_as_json_writes_them(serializer: str, value: object) -> None:
    # A mapping is refused only when two of its keys would become one under JSON.
    if has_colliding_keys(value):
        with pytest.raises(KeyDerivationError):
            key_of(value)
        return
    assert worker_key(serializer, value) == key_of(value)


def test_the_reported_rates_mapping() -> None:
    rates = {1: 0.1, 2: 0.05}
    assert key_of(rates) == key_of({"1": 0.1, "2": 0.05})
    for serializer in SERIALIZERS:
        assert worker_key(serializer, rates) == key_of(rates), serializer


# ---------------------------------------------------------------------------------------------
# Every type keys.py accepts, nested


class Plain(enum.Enum):
    A = "a"
    ONE = 1
    PAIR = (1, "x")


class Text(str, enum.Enum):
    A = "a"
    ONE = "1"


class Number(enum.IntEnum):
    ONE = 1
    TWO = 2


class Point(NamedTuple):
    x: object
    y: object


@dataclasses.dataclass
class Box:
    content: object
    label: str = "box"


class Model(pydantic.BaseModel):
    content: Any
    label: str = "model"


def fixed_offsets() -> st.SearchStrategy[timezone]:
    # Whole minutes: the offsets ISO 8601 writes; seconds are covered by the pickle serializers.
    minutes = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59)
    return minutes.map(lambda m: timezone(timedelta(minutes=m)))


zones = st.none() | fixed_offsets() | st.timezones()
texts = st.text(st.characters() | st.sampled_from(["\ud800", "\udfff"]), max_size=4)
hashable_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats()
    | texts
    | st.binary(max_size=4)
    | st.decimals(allow_nan=False)
    | st.uuids()
    | st.datetimes(timezones=zones)
    | st.dates()
    | st.times(timezones=zones)
    | st.timedeltas()
    | st.sampled_from([*Plain, *Text, *Number])
)
hashables = st.recursive(
    hashable_leaves,
    lambda children: (
        st.lists(children, max_size=3).map(tuple) | st.frozensets(children, max_size=3)
    ),
    max_leaves=6,
)
leaves = (
    hashable_leaves
    | st.decimals()  # NaN, signalling NaN and infinity: unhashable, so never set members
    | st.binary(max_size=4).map(bytearray)
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.builds(Point, children, children)
        | st.dictionaries(hashables, children, max_size=3)
        | st.dictionaries(hashables, children, max_size=3).map(collections.OrderedDict)
        | st.sets(hashables, max_size=3)
        | st.frozensets(hashables, max_size=3)
        | st.builds(Box, children)
        | st.builds(Model, content=children)
    )


values = st.recursive(leaves, containers, max_leaves=10)


@pytest.mark.parametrize("serializer", sorted(SERIALIZERS))
@given(value=values)
@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_every_accepted_value_keys_alike_after_the_round_trip(
    serializer: str, value: object
) -> None:
    try:
        caller = key_of(value)
    except KeyDerivationError as err:
        assert err.path.startswith("value")  # refused at enqueue, naming where
        return
    assert worker_key(serializer, value) in (caller, None)


# ---------------------------------------------------------------------------------------------
# The rule, case by case (the table in docs/keys.md)


def same(a: object, b: object) -> bool:
    return key_of(a) == key_of(b)


def refusal(value: object) -> KeyDerivationError:
    with pytest.raises(KeyDerivationError) as info:
        key_of(value)
    return info.value


def test_none_bool_int_and_float_keys_key_as_their_json_strings() -> None:
    assert same({None: 1, True: 2, False: 3}, {"null": 1, "true": 2, "false": 3})
    assert same({10**30: 1, -5: 2}, {str(10**30): 1, "-5": 2})
    assert same({1.5: 1, 1e16: 2, -0.0: 3}, {"1.5": 1, "1e+16": 2, "-0.0": 3})
    # JSON writes the float key 1.0 as "1.0" and the int key 1 as "1": they stay apart.
    assert same({1.0: 1}, {"1.0": 1}) and not same({1.0: 1}, {1: 1})


def test_enum_keys_key_as_their_value_does() -> None:
    assert same({Number.ONE: 1}, {"1": 1}) and same({Text.A: 1}, {"a": 1})
    assert same({Plain.ONE: 1}, {"1": 1}) and same({Plain.PAIR: 1}, {(1, "x"): 1})


def test_other_hashable_keys_stay_tagged() -> None:
    for key in [(1, 2), b"k", Decimal(1), date(2024, 1, 1), frozenset({1})]:
        assert not same({key: 1}, {str(key): 1}), key
        assert worker_key("celery-pickle", {key: 1}) == key_of({key: 1})
        assert worker_key("celery-json", {key: 1}) is None  # kombu refuses it at send


@pytest.mark.parametrize(
    ("mapping", "first", "second"),
    [
        ({1: "a", "1": "b"}, "1", "'1'"),
        ({"true": "a", True: "b"}, "'true'", "True"),
        ({None: "a", "null": "b"}, "None", "'null'"),
        ({1.5: "a", "1.5": "b"}, "1.5", "'1.5'"),
        ({Plain.A: "a", "a": "b"}, "<Plain.A: 'a'>", "'a'"),
    ],
)
def test_keys_that_collide_under_json_are_refused(
    mapping: dict[object, str], first: str, second: str
) -> None:
    # JSON would keep one value of the two: the worker would run another call.
    error = refusal({"rates": mapping})
    assert error.path == "value.rates" + _segment(list(mapping)[1])
    assert f"mapping keys {first} and {second} are one key" in str(error)


def _segment(key: object) -> str:
    return f".{key}" if isinstance(key, str) and key.isidentifier() else f"[{key!r}]"


def test_kombu_tagged_shape_is_refused() -> None:
    tagged = {"__type__": "decimal", "__value__": "1"}
    assert SERIALIZERS["celery-json"](tagged) == Decimal(1)  # kombu reads it as a Decimal
    error = refusal([{"ok": 1}, tagged])
    assert error.path == "value[1]" and "'__type__' and '__value__'" in str(error)
    assert refusal({"__value__": 1, "__type__": "nothing"}).path == "value"
    roomier = {**tagged, "note": ""}
    assert worker_key("celery-json", roomier) == key_of(roomier)


def test_unkeyable_mapping_keys_are_refused_with_their_path() -> None:
    for key in [float("nan"), float("inf"), 10**5000]:
        error = refusal({"index": {key: 1}})
        assert error.path.startswith("value.index[") and "mapping key" in str(error)


def test_surrogate_pairs_key_as_the_character_json_reads_back() -> None:
    split = "\ud83d\ude00"  # a pair of surrogates, as surrogateescape or UTF-16 data leave them
    assert SERIALIZERS["celery-json"](split) == "\U0001f600"
    assert same(split, "\U0001f600") and same({split: 1}, {"\U0001f600": 1})
    assert not same("\ud83d", "\ude00") and not same("\ude00\ud83d", "\U0001f600")


@pytest.mark.parametrize(
    ("value", "survives_json"),
    [
        ({1: 0.1, "a": [1.0, (2,)]}, {"celery-json": True, "dramatiq-json": True}),
        (b"\x00\xff", {"celery-json": True, "dramatiq-json": False}),
        (bytearray(b"a"), {"celery-json": False, "dramatiq-json": False}),
        (Decimal("1.50"), {"celery-json": True, "dramatiq-json": False}),
        (uuid.UUID(int=7), {"celery-json": True, "dramatiq-json": False}),
        (
            datetime(2024, 1, 1, tzinfo=ZoneInfo("Europe/Paris")),
            {"celery-json": True, "dramatiq-json": False},
        ),
        (date(2024, 1, 1), {"celery-json": True, "dramatiq-json": False}),
        (time(1, tzinfo=timezone.utc), {"celery-json": True, "dramatiq-json": False}),
        (timedelta(days=1), {"celery-json": False, "dramatiq-json": False}),
        ({1, 2}, {"celery-json": False, "dramatiq-json": False}),
        (Number.ONE, {"celery-json": True, "dramatiq-json": True}),
        (Plain.A, {"celery-json": False, "dramatiq-json": False}),
        (Box([1]), {"celery-json": False, "dramatiq-json": False}),
        (Model(content=[1]), {"celery-json": False, "dramatiq-json": False}),
    ],
)
def test_what_each_type_survives(value: object, survives_json: dict[str, bool]) -> None:
    # A value either arrives keyed as sent, or the serializer refuses the message at send.
    caller = key_of(value)
    for serializer in ("celery-pickle", "dramatiq-pickle"):
        assert worker_key(serializer, value) == caller, serializer
    for serializer, survives in survives_json.items():
        assert worker_key(serializer, value) == (caller if survives else None), serializer


def test_memoryview_keys_as_bytes_and_no_serializer_sends_it() -> None:
    assert same(memoryview(b"a"), b"a")
    assert all(worker_key(serializer, memoryview(b"a")) is None for serializer in SERIALIZERS)
