"""Dramatiq's documented API on actors with and without ``idempotent=True``.

Dramatiq's own documentation is the spec: an actor that does not opt in is a plain actor,
and an idempotent one accepts every form a plain one accepts (``send_with_options`` with a
``delay`` in milliseconds or as a ``timedelta``, per-send options), differing only in
deduplication and replay.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import dramatiq
import pytest
from dramatiq import group
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import dq_name
from dramatiq.results import Results
from dramatiq.results.backends import StubBackend

from idemtask import KeyDerivationError
from idemtask.errors import IdempotencyConflict, TaskFailedError
from idemtask.identity import BOUND_FIELD, FINGERPRINT_FIELD, KEY_FIELD
from idemtask.keys import explicit_key
from idemtask.store.base import State

pytestmark = pytest.mark.dramatiq

#: Every ``delay`` form Dramatiq's ``send_with_options`` documents, as milliseconds.
DELAYS: list[tuple[int | timedelta | None, int]] = [
    (None, 0),
    (0, 0),
    (250, 250),
    (timedelta(milliseconds=250), 250),
    (timedelta(seconds=5), 5000),
]
IDEMTASK_FIELDS = {KEY_FIELD, FINGERPRINT_FIELD, BOUND_FIELD}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _assert_delayed(message: dramatiq.Message[Any], delay: Any, delay_ms: int, sent: int) -> None:
    """The message went where a plain send with this delay puts it (any delay, even 0, goes
    through the delay queue)."""
    queue = "default"
    if delay is not None:
        assert message.queue_name == dq_name(queue)
        assert message.options["eta"] >= sent + delay_ms
    else:
        assert message.queue_name == queue
        assert "eta" not in message.options


@pytest.mark.parametrize(("delay", "delay_ms"), DELAYS, ids=str)
def test_idempotent_send_accepts_every_delay_form(stub_env, delay: Any, delay_ms: int) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True)
    def remind(user: int) -> None: ...

    sent = _now_ms()
    message = remind.send_with_options(args=(1,), delay=delay)
    _assert_delayed(message, delay, delay_ms, sent)
    assert remind.send(1).message_id == message.message_id  # reserved: a duplicate
    record = env.middleware.guard.store.inspect(message.options[KEY_FIELD])
    assert record is not None and record.state is State.QUEUED


def test_explicit_key_without_payload_validation_does_not_encode_arguments(
    stub_env, counters
) -> None:
    """With ``validate_payload=False`` an explicit key is the whole identity: the arguments
    are not encoded, so arguments no key could be derived from (NaN) are accepted."""
    env = stub_env(validate_payload=False)

    @dramatiq.actor(idempotent=True, store_results=True)
    def record(reading: Any) -> str:
        counters.hit("record")
        return "recorded"

    env.start()
    first = record.send_with_options(args=(float("nan"),), idempotency_key="reading-1")
    again = record.send_with_options(args=({"v": float("nan")},), idempotency_key="reading-1")
    assert again.message_id == first.message_id
    assert first.options[KEY_FIELD] == explicit_key("record", "reading-1", version=1).key
    group([record.message_with_options(args=(float("nan"),), idempotency_key="reading-2")]).run()
    env.join()
    assert first.get_result(block=True, timeout=5000) == "recorded"
    assert counters.get("record") == 2
    with pytest.raises(KeyDerivationError, match="nan"):  # a derived key still needs them
        record.send(float("nan"))


def test_actor_without_idempotent_is_a_plain_actor(stub_env, counters) -> None:
    """Declared on a broker with the middleware and on one without, the actor is the same."""
    env = stub_env()
    bare = StubBroker()
    bare.add_middleware(Results(backend=StubBackend()))

    def notify(user: int, text: str = "hi") -> None:
        counters.hit("notify")

    options = {"max_retries": 1, "store_results": False}
    guarded_broker = dramatiq.actor(notify, broker=env.broker, **options)
    plain = dramatiq.actor(notify, broker=bare, **options)
    assert guarded_broker.fn is notify
    assert "send_with_options" not in vars(guarded_broker)
    assert guarded_broker.options == plain.options == options
    assert env.middleware.policy_for("notify") is None
    env.start()
    for delay, delay_ms in DELAYS:
        sent = _now_ms()
        ours = guarded_broker.send_with_options(args=(1,), kwargs={"text": "x"}, delay=delay)
        theirs = plain.send_with_options(args=(1,), kwargs={"text": "x"}, delay=delay)
        for message in (ours, theirs):
            _assert_delayed(message, delay, delay_ms, sent)
        assert set(ours.options) == set(theirs.options)
        assert not IDEMTASK_FIELDS & set(ours.options)
    assert guarded_broker.send(1).message_id != guarded_broker.send(1).message_id
    env.broker.join("default", timeout=30_000)
    env.worker.join()
    assert counters.get("notify") == len(DELAYS) + 2  # join waits for the delayed ones too


def test_final_exceptions_are_the_actors_throws(stub_env) -> None:
    """Errors a retry cannot change are set on the actor when it is declared, merged with
    the actor's own ``throws``, so Retries never retries them."""
    env = stub_env(terminal_exceptions=(LookupError,))

    @dramatiq.actor(idempotent=True, throws=ValueError)
    def own(x: int) -> None: ...

    @dramatiq.actor(idempotent=True)
    def none(x: int) -> None: ...

    @dramatiq.actor
    def plain(x: int) -> None: ...

    final = {TaskFailedError, IdempotencyConflict, KeyDerivationError, LookupError}
    assert set(own.options["throws"]) == {ValueError, *final}
    assert set(none.options["throws"]) == final
    assert "throws" not in plain.options
    assert env.middleware.policy_for("none") is not None


def test_options_forwarded_to_another_message_do_not_carry_its_key(stub_env, counters) -> None:
    """A key is bound to the actor and the message it was derived for: options copied onto
    another message (``**message.options``) do not make that message a duplicate."""
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True)
    def square(x: int) -> int:
        counters.hit(f"square-{x}")
        return x * x

    @dramatiq.actor(idempotent=True, store_results=True)
    def cube(x: int) -> int:
        counters.hit(f"cube-{x}")
        return x**3

    env.start()
    first = square.send(3)
    env.join()
    carried = {k: v for k, v in first.options.items() if k in IDEMTASK_FIELDS}
    assert {KEY_FIELD, FINGERPRINT_FIELD} <= carried.keys()
    other_call = square.send_with_options(args=(4,), **carried)
    other_actor = cube.send_with_options(args=(3,), **carried)
    assert first.message_id not in (other_call.message_id, other_actor.message_id)
    env.join()
    assert other_call.get_result(block=True, timeout=5000) == 16
    assert other_actor.get_result(block=True, timeout=5000) == 27
    assert (counters.get("square-3"), counters.get("square-4"), counters.get("cube-3")) == (1, 1, 1)


def test_a_duplicates_handle_enqueued_again_is_the_original(stub_env, counters) -> None:
    """The handle a duplicate ``send()`` returns carries the key bound to the original's id:
    published again, it is a redelivery of the original (replayed), not a new call."""
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True)
    def pay(order: str) -> str:
        counters.hit("pay")
        return f"paid {order}"

    env.start()
    first = pay.send_with_options(args=("o1",), idempotency_key="order-1")
    handle = pay.send_with_options(args=("o1",), idempotency_key="order-1")
    assert handle.message_id == first.message_id
    env.join()
    env.broker.enqueue(handle)
    env.join()
    assert counters.get("pay") == 1
    assert handle.get_result(block=True, timeout=5000) == "paid o1"
