"""One call identity for both adapters: derivation, carried keys and their binding."""

from __future__ import annotations

import math

import pytest

from idemtask.errors import KeyDerivationError
from idemtask.identity import (
    BOUND_FIELD,
    DEFERRALS_FIELD,
    KEY_FIELD,
    Call,
    Identity,
    carry,
    count_deferrals,
    deferrals,
    strip,
)
from idemtask.policy import Policy


def charge(order_id: int, amount: float = 1.0) -> None: ...


def identity(**options: object) -> Identity:
    return Identity("shop.charge", charge, Policy().with_options(options, source="test"))


def test_defaults_and_keywords_give_one_call() -> None:
    ident = identity(idempotency_key=("order_id",))
    assert ident.call((7,), {}) == ident.call((), {"order_id": 7, "amount": 1.0})
    assert ident.call((7,), {}).key == ident.call((7, 2.0), {}).key


def test_a_carried_key_is_used_only_for_the_task_and_message_it_was_derived_for() -> None:
    ident = identity()
    call = ident.call((1,), {})
    fields: dict[str, object] = {}
    carry(call, "msg-1", fields)
    assert ident.carried(fields, "msg-1") == call
    # The same fields forwarded to another message (a child task), or read by another task:
    assert ident.carried(fields, "msg-2") is None
    other = Identity("shop.refund", charge, ident.policy)
    assert other.carried(fields, "msg-1") is None
    # ... then the worker derives the call from the arguments it was delivered.
    assert other.resolve(fields, "msg-1", (1,), {}) == other.call((1,), {})


def test_a_key_carried_without_a_binding_is_trusted() -> None:
    ident = identity()
    assert ident.carried({KEY_FIELD: "k"}, "any") == Call("shop.charge", "k", "")


def test_strip_removes_the_identity() -> None:
    fields: dict[str, object] = {"other": 1}
    carry(Call("t", "k", "f"), "m", fields)
    strip(fields)
    assert fields == {"other": 1}
    assert BOUND_FIELD not in fields


def test_a_deferral_count_travels_in_the_fields_and_a_bad_one_reads_as_none() -> None:
    fields: dict[str, object] = {}
    assert deferrals(fields) == 0
    count_deferrals(3, fields)
    assert fields == {DEFERRALS_FIELD: 3} and deferrals(fields) == 3
    count_deferrals(None, fields)  # a deferral that leaves the count as it is
    assert deferrals(fields) == 3
    for odd, read in (("4", 4), (-2, 0), (True, 0), ("x", 0), ([1], 0), (None, 0)):
        assert deferrals({DEFERRALS_FIELD: odd}) == read, odd
    strip(fields)  # a forwarded header does not start a child task late on the schedule
    assert fields == {}


def test_an_explicit_key_without_payload_validation_does_not_encode_the_arguments() -> None:
    strict = identity()
    with pytest.raises(KeyDerivationError):
        strict.call((1, math.nan), {}, explicit="order-1")
    loose = identity(validate_payload=False)
    assert loose.call((1, math.nan), {}, explicit="order-1").fingerprint == ""
    assert (
        loose.call((1, math.nan), {}, explicit="order-1").key
        == strict.call((1, 2.0), {}, explicit="order-1").key
    )
