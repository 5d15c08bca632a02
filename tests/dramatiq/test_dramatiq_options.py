"""A misspelt idemtask option on a Dramatiq actor is refused at declaration, never ignored.

Dramatiq's ``actor()`` refuses every option no middleware declares before any middleware
hook runs, so there the user reads Dramatiq's ValueError, which names the option. idemtask
adds the did-you-mean where its code sees the name: actors created without the decorator,
the middleware's own settings, and the doctor.
"""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries
from dramatiq.results import Results
from dramatiq.results.backends import StubBackend

from idemtask.dramatiq import IdempotencyMiddleware, check_broker
from idemtask.dramatiq.errors import InvalidActorOptions
from idemtask.errors import ConfigurationError
from idemtask.findings import Level

pytestmark = pytest.mark.dramatiq


def _broker() -> StubBroker:
    broker = StubBroker()
    broker.add_middleware(Results(backend=StubBackend()))
    broker.add_middleware(IdempotencyMiddleware(), before=Retries)
    return broker


def test_the_decorator_refuses_a_misspelling_before_any_middleware_runs(redis_url: str) -> None:
    broker = RedisBroker(url=redis_url)
    try:
        broker.add_middleware(IdempotencyMiddleware(), before=Retries)
        with pytest.raises(ValueError, match="actor options are undefined: idempotency_kye"):

            @dramatiq.actor(broker=broker, idempotent=True, idempotency_kye=("order_id",))
            def charge(order_id: str, amount: int) -> int:
                return amount

        assert "charge" not in broker.actors
    finally:
        broker.close()


def test_an_actor_made_without_the_decorator_is_refused_with_a_hint() -> None:
    broker = _broker()

    def charge(order_id: str, amount: int) -> int:
        return amount

    with pytest.raises(ConfigurationError, match=r"idempotency_kye \(did you mean idempotency_key"):
        dramatiq.Actor(
            charge,
            broker=broker,
            actor_name="charge",
            queue_name="default",
            priority=0,
            options={"idempotent": True, "idempotency_kye": ("order_id",)},
        )
    assert "charge" not in broker.actors


def test_other_middlewares_options_are_not_taken_for_misspellings() -> None:
    broker = _broker()

    @dramatiq.actor(
        broker=broker,
        idempotent=True,
        idempotency_key=("order_id",),
        idempotency_result_ttl=600,
        result_ttl=60_000,  # Results' own option (milliseconds), not idemtask's
        store_results=True,
        max_retries=3,
    )
    def charge(order_id: str, amount: int) -> int:
        return amount

    middleware = next(m for m in broker.middleware if isinstance(m, IdempotencyMiddleware))
    policy = middleware.policy_for("charge")
    assert policy is not None and policy.result_ttl == 600
    finding = next(f for f in check_broker(broker) if f.code == "dramatiq.actor_options")
    assert finding.level is Level.OK


def test_misspelt_middleware_settings_get_a_hint() -> None:
    with pytest.raises(ConfigurationError, match=r"leese \(did you mean lease\?\)"):
        IdempotencyMiddleware(leese=30)


def test_doctor_reports_an_actor_with_a_misspelt_option() -> None:
    """An actor declared before the middleware was added is checked by the doctor."""
    broker = StubBroker()

    def charge(order_id: str) -> None: ...

    dramatiq.Actor(
        charge,
        broker=broker,
        actor_name="charge",
        queue_name="default",
        priority=0,
        options={"leese": 30},
    )
    broker.add_middleware(IdempotencyMiddleware(default_idempotent=True), before=Retries)
    finding = next(f for f in check_broker(broker) if f.code == "dramatiq.actor_options")
    assert finding.level is Level.ERROR
    assert "actor charge: unknown idemtask option(s) leese (did you mean lease?)" in str(finding)


@pytest.mark.parametrize(("value", "guarded"), [(True, True), ("yes", True), ("off", False)])
def test_an_actors_idempotent_option_is_read_as_a_celery_tasks_is(
    value: object, guarded: bool
) -> None:
    """One function reads a task's options for both adapters: ``idempotent`` takes the same
    values on an actor as on a Celery task (and in the environment)."""
    broker = _broker()

    @dramatiq.actor(broker=broker, idempotent=value)
    def charge(order_id: str) -> None: ...

    middleware = next(m for m in broker.middleware if isinstance(m, IdempotencyMiddleware))
    assert (middleware.policy_for("charge") is not None) is guarded


def test_a_bad_idempotent_option_is_refused_with_the_message_a_celery_task_gets() -> None:
    broker = _broker()
    with pytest.raises(InvalidActorOptions) as refused:

        @dramatiq.actor(broker=broker, idempotent="maybe")
        def charge(order_id: str) -> None: ...

    assert str(refused.value) == "actor charge: invalid value 'maybe' for option idempotent"
    assert "charge" not in broker.actors
