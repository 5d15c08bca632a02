"""Keys must be stable across processes and serializer round trips, and tell calls apart."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idemtask.errors import ConfigurationError, IdempotencyError, KeyDerivationError
from idemtask.keys import (
    KEY_SCHEMA_VERSION,
    DerivedKey,
    bind_arguments,
    canonical_bytes,
    derive_key,
    explicit_key,
    validate_key_spec,
)

ROOT = Path(__file__).resolve().parents[1]


def key_of(arguments: dict[str, Any], **options: Any) -> str:
    return derive_key("shop.charge", arguments, **options).key


def same(a: object, b: object) -> bool:
    return canonical_bytes(a) == canonical_bytes(b)


def path_of(value: object, root: str = "") -> str:
    with pytest.raises(KeyDerivationError) as info:
        canonical_bytes(value, root)
    return info.value.path


class Color(enum.Enum):
    RED = "red"


class Level(int, enum.Enum):
    HIGH = 3


@dataclasses.dataclass
class Item:
    sku: str
    extra: object = None


@dataclasses.dataclass
class Order:
    order_id: int
    items: list[Item]


# ---------------------------------------------------------------------------------------------
# JSON round trips and mutations (property based)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)
payloads = st.dictionaries(st.text(max_size=6), json_values, max_size=5)


def json_round_trip(value: object) -> Any:
    return json.loads(json.dumps(value))


def reorder(value: Any) -> Any:
    """The same value with every dict's insertion order reversed."""
    if isinstance(value, dict):
        return {key: reorder(value[key]) for key in reversed(list(value))}
    if isinstance(value, list | tuple):
        return type(value)(reorder(item) for item in value)
    return value


def mutate(draw: st.DrawFn, value: Any) -> Any:
    """Change one thing somewhere in ``value``: a leaf, or a key added or removed."""
    if isinstance(value, dict):
        actions = ["replace", "add"] + (["remove", "descend"] if value else [])
        action = draw(st.sampled_from(actions))
        changed = dict(value)
        if action == "add":
            changed[draw(st.text(max_size=6))] = draw(json_values)
        elif action == "remove":
            del changed[draw(st.sampled_from(sorted(value)))]
        elif action == "descend":
            key = draw(st.sampled_from(sorted(value)))
            changed[key] = mutate(draw, value[key])
        else:
            return draw(json_values)
        return changed
    if isinstance(value, list | tuple):
        actions = ["replace", "append"] + (["remove", "descend"] if value else [])
        action = draw(st.sampled_from(actions))
        items = list(value)
        if action == "append":
            items.append(draw(json_values))
        elif action == "remove":
            del items[draw(st.integers(0, len(items) - 1))]
        elif action == "descend":
            index = draw(st.integers(0, len(items) - 1))
            items[index] = mutate(draw, items[index])
        else:
            return draw(json_values)
        return type(value)(items)
    return draw(json_values)


@st.composite
def payload_and_mutant(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    original = draw(payloads)
    changed = mutate(draw, original)
    if not isinstance(changed, dict):  # the root itself was replaced: keep it a mapping
        changed = {"replaced": changed}
    return original, changed


@given(payloads)
def test_key_survives_a_json_round_trip(payload: dict[str, Any]) -> None:
    assert derive_key("t", payload) == derive_key("t", json_round_trip(payload))


@given(payloads)
def test_key_ignores_dict_order(payload: dict[str, Any]) -> None:
    assert derive_key("t", payload) == derive_key("t", reorder(payload))


@given(payload_and_mutant())
def test_any_single_change_changes_the_key(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    original, changed = pair
    # Python equality after a JSON round trip is the reference: 1 == 1.0, (1,) == [1].
    if json_round_trip(original) != json_round_trip(changed):
        assert key_of(original) != key_of(changed)
        assert derive_key("t", original).fingerprint != derive_key("t", changed).fingerprint


@given(st.integers(), st.integers())
def test_distinct_ints_encode_distinctly(a: int, b: int) -> None:
    assert (canonical_bytes(a) == canonical_bytes(b)) == (a == b)


@given(st.lists(st.text(max_size=4), max_size=4), st.lists(st.text(max_size=4), max_size=4))
def test_adjacent_strings_never_run_together(a: list[str], b: list[str]) -> None:
    assert (canonical_bytes(a) == canonical_bytes(b)) == (a == b)


# ---------------------------------------------------------------------------------------------
# Determinism across interpreters

PAYLOAD_SOURCE = """
import uuid
from datetime import datetime, timezone, timedelta
from decimal import Decimal

PAYLOAD = {
    "tags": {"beta", "alpha", "gamma", 3, (1, "x"), b"raw"},
    "frozen": frozenset({"x", "y", "z"}),
    "mixed": {1: "int", "one": "str", (1, "x"): "tuple", None: "none", 2.5: "float", b"k": "b"},
    "amount": Decimal("12.50"),
    "at": datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2))),
    "naive": datetime(2024, 5, 1, 12, 30, 0, 15),
    "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "blob": b"\\x00\\xff",
    "nested": [{"b": 1, "a": [1.5, None, True]}, ("t", 2)],
}
"""

SUBPROCESS_SCRIPT = (
    PAYLOAD_SOURCE
    + """
from idemtask.keys import canonical_bytes, derive_key
derived = derive_key("shop.charge", PAYLOAD)
print(derived.key, derived.fingerprint, canonical_bytes(PAYLOAD).hex())
"""
)


def fixed_payload() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(PAYLOAD_SOURCE, namespace)
    payload: dict[str, Any] = namespace["PAYLOAD"]
    return payload


def run_in_fresh_interpreter(hash_seed: str) -> str:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = hash_seed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def test_same_key_in_interpreters_with_different_hash_seeds() -> None:
    first = run_in_fresh_interpreter("1")
    second = run_in_fresh_interpreter("2")
    assert first == second
    derived = derive_key("shop.charge", fixed_payload())
    assert first.split()[:2] == [derived.key, derived.fingerprint]


def test_key_schema_is_pinned() -> None:
    # If this fails, keys written by the previous release no longer match the same calls:
    # that needs a KEY_SCHEMA_VERSION bump and a release note, not a new expected value.
    assert KEY_SCHEMA_VERSION == 1
    without_mapping_keys = {k: v for k, v in fixed_payload().items() if k != "mixed"}
    assert derive_key("shop.charge", without_mapping_keys) == DerivedKey(
        key="b822638cb68892a8294c2647b0329762",
        fingerprint="ccb2995116a11cc9725962e31166fbf7",
    )
    assert explicit_key("shop.charge", "order-42").key == "432cacb767e1ffd48624956ed1b62494"


def test_non_string_mapping_keys_are_pinned_as_json_writes_them() -> None:
    # None, bool, int and float mapping keys are keyed as the strings JSON writes for them:
    # {1: x} keys as {"1": x} always did, the call a JSON worker sees (docs/keys.md, 8).
    derived = derive_key("shop.charge", fixed_payload())
    assert derived == DerivedKey(
        key="45880deaebac51a5ddd542b84ef33e2b",
        fingerprint="706bcc857886cb604b41f4dc91c95b86",
    )


def test_derived_key_shape() -> None:
    derived = derive_key("t", {"x": 1})
    assert len(derived.key) == 32 and int(derived.key, 16) >= 0
    assert len(derived.fingerprint) == 32 and derived.fingerprint != derived.key
    with pytest.raises(dataclasses.FrozenInstanceError):
        derived.key = "other"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Binding calls to signatures


def f(x: int, y: int = 2) -> None:
    pass


def test_positional_keyword_and_defaulted_calls_share_a_key() -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((1,), {}),
        ((1, 2), {}),
        ((), {"x": 1}),
        ((1,), {"y": 2}),
        ((), {"y": 2, "x": 1}),
    ]
    keys = {key_of(bind_arguments(f, args, kwargs, task_name="f")) for args, kwargs in calls}
    assert len(keys) == 1
    assert key_of(bind_arguments(f, (1, 3), {}, task_name="f")) not in keys


def g(a: int, /, b: int, *rest: int, c: int = 3, **extra: int) -> None:
    pass


def h(a: int, b: str = "b", *, c: float = 1.5, d: object = None) -> None:
    pass


@pytest.mark.parametrize(
    ("fn", "args", "kwargs"),
    [
        (f, (1,), {}),
        (f, (1, 5), {}),
        (f, (), {"y": 5, "x": 1}),
        (g, (1, 2), {}),
        (g, (1, 2, 3, 4), {"c": 5, "z": 6}),
        (h, (1,), {}),
        (h, (1, "x"), {"d": [1]}),
        (h, (), {"c": 2.5, "a": 0}),
    ],
)
def test_binding_matches_inspect(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    reference = inspect.signature(fn).bind(*args, **kwargs)
    reference.apply_defaults()
    bound = bind_arguments(fn, args, kwargs, task_name="t")
    assert list(bound.items()) == list(reference.arguments.items())


@pytest.mark.parametrize(
    ("fn", "args", "kwargs"),
    [
        (f, (), {}),  # missing x
        (f, (1, 2, 3), {}),  # too many
        (f, (1,), {"x": 1}),  # x twice
        (f, (1,), {"z": 1}),  # unknown
        (h, (1, "b", 2.0), {}),  # c is keyword-only
        (g, (), {"a": 1, "b": 2}),  # a is positional-only
    ],
)
def test_arguments_that_do_not_bind_are_rejected(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(KeyDerivationError, match=r"do not match the signature of shop\.charge"):
        bind_arguments(fn, args, kwargs, task_name="shop.charge")


def test_bound_methods_drop_self() -> None:
    class Task:
        def run(self, order_id: int, amount: int = 10) -> None:
            pass

    first, second = Task(), Task()
    expected = {"order_id": 7, "amount": 10}
    assert bind_arguments(first.run, (7,), {}, task_name="t") == expected
    assert bind_arguments(second.run, (), {"order_id": 7}, task_name="t") == expected


def test_callable_without_a_signature_keeps_args_and_kwargs() -> None:
    class Opaque:
        __signature__ = "not a signature"

        def __call__(self, *args: Any, **kwargs: Any) -> None:
            pass

    bound = bind_arguments(Opaque(), (1, 2), {"k": 3}, task_name="t")
    assert bound == {"args": [1, 2], "kwargs": {"k": 3}}
    assert bind_arguments(max, (1, 2), {}, task_name="max") == {"args": [1, 2], "kwargs": {}}


# ---------------------------------------------------------------------------------------------
# Key specs, explicit keys, scoping


def charge(order_id: int, amount: int, note: str = "") -> None:
    pass


def bound_charge(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return bind_arguments(charge, args, kwargs, task_name="shop.charge")


def test_subset_spec_keys_on_named_arguments_only() -> None:
    spec = ("order_id",)
    one = derive_key("shop.charge", bound_charge(1, 100), spec=spec)
    other_amount = derive_key("shop.charge", bound_charge(1, 200), spec=spec)
    other_order = derive_key("shop.charge", bound_charge(2, 100), spec=spec)
    assert one.key == other_amount.key
    assert one.fingerprint != other_amount.fingerprint  # a reused key with new arguments
    assert one.key != other_order.key


def test_subset_spec_order_does_not_matter() -> None:
    arguments = bound_charge(1, 100)
    assert key_of(arguments, spec=("order_id", "amount")) == key_of(
        arguments, spec=("amount", "order_id")
    )


def test_subset_spec_naming_a_missing_argument() -> None:
    with pytest.raises(KeyDerivationError) as info:
        derive_key("shop.charge", {"amount": 1}, spec=("order_id",))
    assert info.value.path == "order_id"


def test_callable_spec_gets_the_call_as_made() -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def by_order(*args: Any, **kwargs: Any) -> object:
        seen.append((args, kwargs))
        return {"order": args[0]}

    one = derive_key("shop.charge", bound_charge(1, 100), spec=by_order, args=(1, 100), kwargs={})
    two = derive_key(
        "shop.charge", bound_charge(1, 200), spec=by_order, args=(1,), kwargs={"amount": 200}
    )
    assert seen == [((1, 100), {}), ((1,), {"amount": 200})]
    assert one.key == two.key and one.fingerprint != two.fingerprint


def test_callable_spec_errors_name_the_function() -> None:
    def broken(order_id: int) -> object:
        raise LookupError("no such order")

    with pytest.raises(KeyDerivationError, match="broken raised LookupError: no such order"):
        derive_key("t", {"order_id": 1}, spec=broken, args=(1,))

    def unencodable(order_id: int) -> object:
        return [order_id, object()]

    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", {"order_id": 1}, spec=unencodable, args=(1,))
    assert info.value.path.endswith("unencodable()[1]")


def test_explicit_keys() -> None:
    first = explicit_key("shop.charge", "order-42")
    assert first == explicit_key("shop.charge", "order-42")
    assert first.fingerprint == ""
    assert first.key != explicit_key("shop.charge", "order-43").key
    assert first.key != explicit_key("shop.refund", "order-42").key
    assert first.key != explicit_key("shop.charge", "order-42", version=2).key
    # A caller's key never lands on a derived one, whatever string it is.
    assert first.key != derive_key("shop.charge", {}, spec=lambda: "order-42").key


def test_explicit_key_fingerprint_matches_the_derived_one() -> None:
    arguments = bound_charge(1, 100)
    derived = derive_key("shop.charge", arguments)
    given_key = explicit_key("shop.charge", "order-1", arguments=arguments)
    assert given_key.fingerprint == derived.fingerprint
    other = explicit_key("shop.charge", "order-1", arguments=bound_charge(1, 200))
    assert other.key == given_key.key and other.fingerprint != given_key.fingerprint


@pytest.mark.parametrize("bad", ["", None, 42, b"bytes"])
def test_explicit_key_must_be_a_non_empty_string(bad: Any) -> None:
    with pytest.raises(KeyDerivationError, match="non-empty string"):
        explicit_key("t", bad)


def test_task_name_and_version_scope_the_key() -> None:
    arguments = {"order_id": 1}
    base = derive_key("shop.charge", arguments)
    assert base.key != derive_key("shop.refund", arguments).key
    assert base.key != derive_key("shop.charge", arguments, version=2).key
    assert base == derive_key("shop.charge", arguments, version=1)
    # The fingerprint describes the payload, not the key version.
    assert base.fingerprint == derive_key("shop.charge", arguments, version=2).fingerprint
    assert base.fingerprint != derive_key("shop.refund", arguments).fingerprint


def test_version_must_be_an_int() -> None:
    with pytest.raises(ConfigurationError):
        derive_key("t", {}, version=True)
    with pytest.raises(ConfigurationError):
        explicit_key("t", "k", version="2")  # type: ignore[arg-type]


def test_validate_key_spec_accepts_good_specs() -> None:
    validate_key_spec(charge, None, task_name="shop.charge")
    validate_key_spec(charge, ("order_id", "note"), task_name="shop.charge")
    validate_key_spec(charge, lambda order_id, **_: order_id, task_name="shop.charge")
    validate_key_spec(None, ("anything",), task_name="shop.charge")  # nothing to check against


def test_validate_key_spec_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        validate_key_spec(charge, ("order",), task_name="shop.charge")
    message = str(info.value)
    assert "'order'" in message and "order_id, amount, note" in message


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("order_id", "('order_id',)"),
        (["order_id"], "('order_id',)"),
        ((), "empty tuple"),
        (("order_id", 1), "as strings"),
        (42, "not int"),
    ],
)
def test_validate_key_spec_rejects_bad_specs(spec: Any, hint: str) -> None:
    with pytest.raises(ConfigurationError, match=r"shop\.charge") as info:
        validate_key_spec(charge, spec, task_name="shop.charge")
    assert hint in str(info.value)
    assert isinstance(info.value, IdempotencyError)


def test_derive_key_rejects_a_string_spec_too() -> None:
    with pytest.raises(ConfigurationError, match=r"\('order_id',\)"):
        derive_key("shop.charge", {"order_id": 1}, spec="order_id")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Canonical encoding rules


def test_bool_is_not_int() -> None:
    assert not same(True, 1) and not same(False, 0)
    assert key_of({"x": True}) != key_of({"x": 1})


def test_tuple_is_list_and_integral_float_is_int() -> None:
    assert same((1, "a", (2,)), [1, "a", [2]])
    assert same(1.0, 1) and same(-0.0, 0) and same(1e20, 10**20)
    assert not same(0.5, "0.5") and not same(1.5, 1)
    assert not same(0.1, 0.1000000000000001)


def test_values_of_different_kinds_never_meet() -> None:
    values: list[object] = [None, "", b"", [], {}, set(), 0, False, "None", "0", Decimal(0)]
    assert len({canonical_bytes(value) for value in values}) == len(values)
    assert not same("abc", b"abc")
    assert not same(["ab", "c"], ["a", "bc"])
    assert not same({"a": "bc"}, {"ab": "c"})


def test_bytes_like_values_agree() -> None:
    assert same(b"ab", bytearray(b"ab")) and same(b"ab", memoryview(b"ab"))


def test_mappings_sort_mixed_keys() -> None:
    forward = {1: "a", "one": "b", None: "c", (1, 2): "d", 2.5: "e"}
    backward = dict(reversed(list(forward.items())))
    assert same(forward, backward)
    assert not same({(1, 2): "a"}, {"(1, 2)": "a"})


def test_sets_are_sorted_and_tagged() -> None:
    assert same({"b", "a", 3}, frozenset({3, "a", "b"}))
    assert not same({1, 2}, [1, 2])
    assert not same({1, 2}, {1, 3})


def test_aware_datetimes_compare_by_instant() -> None:
    utc = datetime(2024, 1, 1, 12, tzinfo=timezone.utc)
    plus_two = datetime(2024, 1, 1, 14, tzinfo=timezone(timedelta(hours=2)))
    minus_five = datetime(2024, 1, 1, 7, tzinfo=timezone(timedelta(hours=-5)))
    assert same(utc, plus_two) and same(utc, minus_five)
    assert not same(utc, datetime(2024, 1, 1, 12))  # naive is not aware
    assert not same(utc, datetime(2024, 1, 1, 12, 0, 0, 1, tzinfo=timezone.utc))


def test_dates_times_and_durations() -> None:
    assert not same(date(2024, 1, 1), datetime(2024, 1, 1))
    assert not same(time(12), time(12, 0, 0, 1))
    assert same(time(12, tzinfo=timezone.utc), time(13, tzinfo=timezone(timedelta(hours=1))))
    assert not same(time(12), time(12, tzinfo=timezone.utc))
    assert same(timedelta(days=1), timedelta(hours=24))
    assert not same(timedelta(seconds=1), 1)


def test_decimals_are_normalized_without_rounding() -> None:
    assert same(Decimal("1.10"), Decimal("1.1"))
    assert same(Decimal("100"), Decimal("1E+2"))
    assert same(Decimal("0.000"), Decimal("-0"))
    assert not same(Decimal("1.1"), Decimal("-1.1"))
    long_one = Decimal("1." + "0" * 40 + "1")  # longer than the default context precision
    assert not same(long_one, Decimal(1))


def test_uuid_is_tagged() -> None:
    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert same(value, uuid.UUID(str(value)))
    assert not same(value, str(value)) and not same(value, value.bytes)


def test_enum_encodes_as_its_value() -> None:
    assert same(Color.RED, "red") and same(Level.HIGH, 3)
    assert key_of({"color": Color.RED}) == key_of({"color": "red"})


def test_subclasses_of_builtins_encode_as_the_builtin() -> None:
    class Name(str):
        def __str__(self) -> str:
            return "something else"

    class Count(int):
        pass

    assert same(Name("bob"), "bob") and same(Count(3), 3)


def test_dataclass_encodes_like_a_dict_of_its_fields() -> None:
    order = Order(order_id=1, items=[Item("a"), Item("b", extra=[1])])
    as_dict = {
        "order_id": 1,
        "items": [{"sku": "a", "extra": None}, {"sku": "b", "extra": [1]}],
    }
    assert same(order, as_dict)


def test_pydantic_model_encodes_like_its_dump() -> None:
    import pydantic

    class Line(pydantic.BaseModel):  # type: ignore[misc, name-defined]
        sku: str
        qty: int = 1

    assert same(Line(sku="a"), {"sku": "a", "qty": 1})


def test_duck_typed_model_dump_is_used() -> None:
    class Model:
        def model_dump(self, mode: str) -> dict[str, Any]:
            assert mode == "python"
            return {"a": 1}

    assert same(Model(), {"a": 1})


# ---------------------------------------------------------------------------------------------
# Errors name the offending value


def test_path_of_an_object_deep_inside_arguments() -> None:
    arguments = {"order": {"items": [1, 2, 3, object()]}}
    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", arguments)
    assert info.value.path == "order.items[3]"
    assert str(info.value).startswith("order.items[3]: cannot encode value of type object")
    assert "idempotency_key" in str(info.value)
    assert isinstance(info.value, TypeError)  # callers may already catch TypeError


def test_messages_say_the_path_once() -> None:
    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", {"order_id": 1, "amount": object()})
    assert str(info.value) == (
        "amount: cannot encode value of type object; pass a JSON-like value or set idempotency_key"
    )
    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", {"amount": 1}, spec=("order_id",))
    assert str(info.value) == (
        "order_id: not among the call's arguments, but the idempotency key of t names it"
    )
    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", {"index": {(1, object()): 2}})
    assert str(info.value).count("idempotency_key") == 1


def test_an_argument_the_key_names_that_cannot_be_encoded_hints_at_a_key_function() -> None:
    """The key is set (it names the argument): the hint is not to set it, but what to do
    with the value it names."""
    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", {"order": object(), "amount": 1}, spec=("order",))
    assert str(info.value) == (
        "order: cannot encode value of type object; the idempotency_key names this argument: "
        "pass a JSON-like value, or key by a function that returns one from it"
    )


def _amount_key(order_id: int, amount: object) -> object:
    return amount


def test_a_fingerprint_that_cannot_be_made_hints_at_validate_payload() -> None:
    """The key covers order_id alone; the payload fingerprint covers amount too."""
    arguments = {"order_id": 7, "amount": object()}
    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", arguments, spec=("order_id",))
    assert str(info.value) == (
        "amount: cannot encode value of type object; validate_payload fingerprints every "
        "argument, also those the idempotency_key leaves out: pass a JSON-like value or set "
        "validate_payload=False"
    )
    with pytest.raises(KeyDerivationError) as info:
        explicit_key("t", "order-7", arguments=arguments)
    assert str(info.value) == (
        "amount: cannot encode value of type object; validate_payload fingerprints every "
        "argument, even under an explicit idempotency_key: pass a JSON-like value or set "
        "validate_payload=False"
    )
    unchecked = derive_key("t", arguments, spec=("order_id",), validate_payload=False)
    assert unchecked.fingerprint == ""
    assert unchecked.key == derive_key("t", {"order_id": 7, "amount": 1}, spec=("order_id",)).key
    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", arguments, spec=_amount_key, args=(7, object()))
    assert str(info.value) == (
        "_amount_key(): cannot encode value of type object; the idempotency_key function must "
        "return a JSON-like value"
    )


def test_path_through_a_dataclass() -> None:
    order = Order(1, [Item("a"), Item("b"), Item("c"), Item("d", extra=lambda: None)])
    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", {"order": order})
    assert info.value.path == "order.items[3].extra"
    assert "function" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), Decimal("NaN")])
def test_nan_and_infinity_are_rejected(bad: object) -> None:
    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", {"amount": [bad]})
    assert info.value.path == "amount[0]"


def test_paths_for_dict_keys() -> None:
    assert path_of({"my-key": object()}, "m") == "m['my-key']"
    assert path_of({3: object()}, "m") == "m[3]"
    assert path_of({"ok": object()}) == "ok"
    assert path_of([object()]) == "[0]"


def test_unencodable_dict_key_is_named() -> None:
    class Token:
        def __repr__(self) -> str:
            return "Token(7)"

    with pytest.raises(KeyDerivationError) as info:
        derive_key("t", {"index": {"ok": 1, Token(): 2}})
    assert info.value.path == "index[Token(7)]"
    assert "key" in str(info.value)


def test_unencodable_set_element_and_cycles() -> None:
    assert path_of({"tags": {1, object()}}).startswith("tags{")
    cycle: list[object] = []
    cycle.append(cycle)
    assert path_of(cycle, "loop") == "loop"


def test_arbitrary_objects_are_rejected() -> None:
    for value in (object(), print, Color, type, iter([]), range(3)):
        with pytest.raises(KeyDerivationError, match="cannot encode value of type"):
            canonical_bytes(value, "x")
