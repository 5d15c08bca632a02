"""A delivery another middleware sets aside before the actor runs gives its key back idle:
the body never ran, so the skip's reason is never recorded as the call's failure."""

from __future__ import annotations

from typing import Any

import dramatiq
import pytest
from dramatiq.broker import Broker, MessageProxy
from dramatiq.middleware import Middleware, MiddlewareError, SkipMessage

from idemtask.dramatiq import IdempotencyMiddleware
from idemtask.dramatiq.middleware import KEY_OPTION
from idemtask.store.base import State

pytestmark = pytest.mark.dramatiq


class RoutingUnavailable(MiddlewareError):
    """A middleware's own refusal (Dramatiq propagates only ``MiddlewareError`` from hooks)."""


class SetsAsideFirstCopy(Middleware):
    """Runs after idemtask decided: sets the first message aside the way ``how`` says (a
    skip, an error of its own, or ``message.fail()``), and lets every later one through."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.seen: list[str] = []

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        first = not self.seen
        self.seen.append(message.message_id)
        if not first:
            return
        if self.how == "skip":
            raise SkipMessage("maintenance window")
        if self.how == "raise":
            raise RoutingUnavailable("routing table unavailable")
        message.fail()


@pytest.mark.parametrize("how", ["skip", "raise", "fail"])
def test_a_message_set_aside_after_the_decision_leaves_the_key_idle(
    stub_env: Any, counters: Any, decisions: Any, how: str
) -> None:
    env = stub_env(terminal_exceptions=(Exception,))  # every error of the body is final
    aside = SetsAsideFirstCopy(how)
    env.broker.add_middleware(aside, after=IdempotencyMiddleware)

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=0)
    def charge(order: int) -> str:
        counters.hit("charge")
        return f"charged {order}"

    env.start()
    first = charge.send(7)
    env.join()
    assert aside.seen == [first.message_id] and counters.get("charge") == 0
    record = env.middleware.guard.store.inspect(first.options[KEY_OPTION])
    assert record is not None and record.state is State.IDLE, record
    assert decisions.count("released") == 1
    # Another call of the key runs the body: nothing recorded the skip as its answer.
    again = charge.send(7)
    env.join()
    assert again.message_id != first.message_id
    assert again.get_result(block=True, timeout=5000) == "charged 7"
    assert counters.get("charge") == 1


def test_a_message_too_old_to_run_gives_its_reservation_back(
    stub_env: Any, counters: Any, decisions: Any
) -> None:
    """AgeLimit (before idemtask, in Dramatiq's default stack) skips a message idemtask never
    decided: its ``send`` reservation is given back, so the next call is sent anew instead of
    getting the dead message until ``reservation_ttl`` ends."""
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True, max_age=10)
    def charge(order: int) -> str:
        counters.hit("charge")
        return f"charged {order}"

    env.start()
    first = charge.send_with_options(args=(7,), delay=100)  # older than max_age when it runs
    env.join()
    assert counters.get("charge") == 0 and decisions.count("acquired") == 0
    record = env.middleware.guard.store.inspect(first.options[KEY_OPTION])
    assert record is not None and record.state is State.IDLE, record
    again = charge.send_with_options(args=(7,), max_age=60_000)
    env.join()
    assert again.message_id != first.message_id
    assert again.get_result(block=True, timeout=5000) == "charged 7"
    assert counters.get("charge") == 1
