"""``check_broker`` and the presets, on real brokers and a real store Redis."""

from __future__ import annotations

import uuid

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries, TimeLimit
from dramatiq.results import Results
from dramatiq.results.backends import StubBackend

from idemtask import ConfigurationError
from idemtask.dramatiq import IdempotencyMiddleware, check_broker, presets
from idemtask.findings import Level, has_errors
from idemtask.policy import Policy

pytestmark = pytest.mark.dramatiq


def _levels(findings: list) -> dict[str, Level]:
    worst: dict[str, Level] = {}
    order = [Level.OK, Level.WARNING, Level.ERROR]
    for f in findings:
        if f.code not in worst or order.index(f.level) > order.index(worst[f.code]):
            worst[f.code] = f.level
    return worst


def test_clean_setup_reports_ok_findings(fresh_redis) -> None:
    store = fresh_redis(appendonly=True, config={"maxmemory-policy": "noeviction"})
    preset = presets.at_least_once(lease=30, time_limit=120)
    broker = RedisBroker(
        url=store.url, namespace=f"d{uuid.uuid4().hex[:8]}", middleware=preset.middleware(),
        **preset.redis_broker,
    )  # fmt: skip
    try:
        broker.add_middleware(Results(backend=StubBackend()))
        broker.add_middleware(
            IdempotencyMiddleware(redis_url=store.url, **preset.idemtask), before=Retries
        )

        @dramatiq.actor(broker=broker, idempotent=True, store_results=True)
        def job(x: int) -> int:
            return x

        findings = check_broker(broker)
        levels = _levels(findings)
        assert not has_errors(findings), [str(f) for f in findings]
        assert all(level is Level.OK for level in levels.values()), [str(f) for f in findings]
        for code in (
            "dramatiq.middleware_order",
            "dramatiq.results",
            "dramatiq.time_limit",
            "dramatiq.heartbeat_timeout",
            "store.eviction",
            "store.persistence",
        ):
            assert code in levels
    finally:
        broker.close()


def test_misconfigurations_are_reported(fresh_redis, redis_url) -> None:
    store = fresh_redis(config={"maxmemory-policy": "allkeys-lru"})
    broker = RedisBroker(
        url=redis_url, namespace=f"d{uuid.uuid4().hex[:8]}", heartbeat_timeout=5000
    )
    try:
        broker.add_middleware(IdempotencyMiddleware(redis_url=store.url, lease=60))  # after Retries
        for m in broker.middleware:
            if isinstance(m, TimeLimit):
                m.time_limit = float("inf")

        @dramatiq.actor(broker=broker, idempotent=True, on_running="wait", wait_timeout=10)
        def job(x: int) -> None: ...

        levels = _levels(check_broker(broker))
        assert levels["dramatiq.middleware_order"] is Level.ERROR
        assert levels["dramatiq.results"] is Level.WARNING
        assert levels["dramatiq.time_limit"] is Level.WARNING
        assert levels["dramatiq.heartbeat_timeout"] is Level.WARNING
        assert levels["store.eviction"] is Level.ERROR
        assert levels["store.persistence"] is Level.WARNING
    finally:
        broker.close()


def test_wait_policy_inside_time_limit_is_an_error(redis_url) -> None:
    broker = StubBroker()
    broker.add_middleware(IdempotencyMiddleware(redis_url=redis_url), before=Retries)

    @dramatiq.actor(
        broker=broker, idempotent=True, on_running="wait", wait_timeout=30, time_limit=5000
    )
    def job(x: int) -> None: ...

    levels = _levels(check_broker(broker))
    assert levels["dramatiq.time_limit"] is Level.ERROR


def test_memory_store_with_a_real_broker_is_an_error(redis_url) -> None:
    broker = RedisBroker(url=redis_url, namespace=f"d{uuid.uuid4().hex[:8]}")
    try:
        broker.add_middleware(IdempotencyMiddleware(), before=Retries)
        assert _levels(check_broker(broker))["store.shared"] is Level.ERROR
    finally:
        broker.close()
    stub = StubBroker()
    stub.add_middleware(IdempotencyMiddleware(), before=Retries)
    assert _levels(check_broker(stub))["store.shared"] is Level.OK


def test_missing_middleware_is_an_error() -> None:
    findings = check_broker(StubBroker())
    assert [f.code for f in findings] == ["dramatiq.middleware"]
    assert has_errors(findings)


def test_a_broker_with_the_middleware_but_no_idempotent_actor_is_warned_about(
    redis_url: str,
) -> None:
    broker = StubBroker()
    broker.add_middleware(IdempotencyMiddleware(redis_url=redis_url), before=Retries)
    try:

        @dramatiq.actor(broker=broker)
        def job(x: int) -> int:
            return x

        actors = [f for f in check_broker(broker) if f.code == "dramatiq.actors"]
        assert [(f.level, f.message) for f in actors] == [
            (Level.WARNING, "no actor is declared idempotent")
        ]
        assert "idempotent=True" in actors[0].fix

        @dramatiq.actor(broker=broker, idempotent=True)
        def guarded(x: int) -> int:
            return x

        actors = [f for f in check_broker(broker) if f.code == "dramatiq.actors"]
        assert [(f.level, f.message) for f in actors] == [(Level.OK, "1 idempotent actor(s)")]
    finally:
        broker.close()


def _plain_charge(order_id: int) -> int:
    return order_id


def test_actor_options_without_the_middleware_are_unguarded() -> None:
    broker = StubBroker()
    dramatiq.Actor(
        _plain_charge,
        broker=broker,
        actor_name="charge",
        queue_name="default",
        priority=0,
        options={"idempotent": True, "idempotency_key": ("order_id",)},
    )
    dramatiq.Actor(
        _plain_charge, broker=broker, actor_name="plain", queue_name="default", priority=0,
        options={},
    )  # fmt: skip
    findings = check_broker(broker)
    assert [f.code for f in findings] == ["dramatiq.middleware", "dramatiq.unguarded"]
    unguarded = findings[1]
    assert unguarded.level is Level.ERROR
    assert unguarded.message == (
        "these actors set idemtask options but the broker has no IdempotencyMiddleware, so "
        "nothing guards them: charge (idempotency_key, idempotent)"
    )


def test_actor_options_without_idempotent_true_are_unguarded() -> None:
    broker = StubBroker()
    broker.add_middleware(IdempotencyMiddleware(), before=Retries)

    @dramatiq.actor(broker=broker, idempotency_key=("order_id",), lease=30)
    def forgot(order_id: int) -> int:
        return order_id

    @dramatiq.actor(broker=broker, idempotent=False, lease=30)
    def opted_out(order_id: int) -> int:
        return order_id

    @dramatiq.actor(broker=broker, idempotent=True, lease=30)
    def guarded(order_id: int) -> int:
        return order_id

    unguarded = next(f for f in check_broker(broker) if f.code == "dramatiq.unguarded")
    assert unguarded.level is Level.ERROR
    assert unguarded.message == (
        "these actors set idemtask options but they are not declared idempotent=True, so "
        "nothing guards them: forgot (idempotency_key, lease)"
    )
    broker = StubBroker()
    broker.add_middleware(IdempotencyMiddleware(default_idempotent=True), before=Retries)

    @dramatiq.actor(broker=broker, idempotency_key=("order_id",))
    def by_default(order_id: int) -> int:
        return order_id

    unguarded = next(f for f in check_broker(broker) if f.code == "dramatiq.unguarded")
    assert unguarded.level is Level.OK


def test_presets_fit_the_lease() -> None:
    preset = presets.at_least_once(lease=45, time_limit=300, result_ttl=30 * 86400)
    assert preset.redis_broker["heartbeat_timeout"] > 45_000
    assert preset.redis_broker["dead_message_ttl"] >= 30 * 86_400_000
    assert preset.rabbitmq_consumer_timeout_ms > 300_000 + 45_000
    assert preset.rabbitmq_conf == f"consumer_timeout = {preset.rabbitmq_consumer_timeout_ms}"
    stack = preset.middleware()
    limits = [m for m in stack if isinstance(m, TimeLimit)]
    retries = [m for m in stack if isinstance(m, Retries)]
    assert limits[0].time_limit == 300_000 and retries[0].max_retries == 10
    assert [type(m) for m in stack] == list(dramatiq.middleware.default_middleware)
    with pytest.raises(ConfigurationError, match="finite"):
        presets.at_least_once(time_limit=float("inf"))
    with pytest.raises(ConfigurationError, match="wait_timeout"):
        presets.at_least_once(time_limit=10, wait_timeout=30)


def test_presets_take_a_result_ttl_shorter_than_the_lease(stub_env, counters) -> None:
    """A record outlives every lease on it by ``result_ttl`` (Record lifetime), so any
    positive ``result_ttl`` is safe with any lease: the preset accepts what the policy
    accepts, and the middleware runs with its values."""
    preset = presets.at_least_once(lease=60, time_limit=600, result_ttl=30)
    assert preset.idemtask == {"lease": 60, "result_ttl": 30}
    assert preset.redis_broker["dead_message_ttl"] >= 30_000
    env = stub_env(**preset.idemtask)

    @dramatiq.actor(idempotent=True, store_results=True)
    def charge(order: int) -> int:
        counters.hit("charge")
        return order

    env.start()
    first = charge.send(5)
    env.join()
    assert first.get_result(block=True, timeout=5000) == 5
    assert charge.send(5).message_id == first.message_id
    assert counters.get("charge") == 1


@pytest.mark.parametrize("given", [{"result_ttl": 0}, {"result_ttl": -1}, {"lease": 0}])
def test_presets_refuse_what_the_policy_refuses(given: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError) as by_policy:
        Policy().with_options(given, source="presets.at_least_once")
    with pytest.raises(ConfigurationError) as by_preset:
        presets.at_least_once(**given)
    assert str(by_preset.value) == str(by_policy.value)


SECRET = "s3cr3tPW"


def test_doctor_shows_no_password(fresh_redis, caplog) -> None:
    import logging

    down = fresh_redis()
    port = down.port
    down.stop()
    caplog.set_level(logging.DEBUG)
    urls = [
        f"redis://user:{SECRET}@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password={SECRET}",
        f"redis+sentinel://:{SECRET}@127.0.0.1:{port}/svc?sentinel_password={SECRET}",
    ]
    for url in urls:
        broker = StubBroker()
        broker.add_middleware(IdempotencyMiddleware(redis_url=url), before=Retries)
        text = "\n".join(map(str, check_broker(broker)))
        assert "store.reachable" in text and "***" in text and SECRET not in text
        assert SECRET not in repr(broker.middleware)
    with pytest.raises(ConfigurationError) as info:
        _ = IdempotencyMiddleware(redis_url=f"redis+sentinel://:{SECRET}@h:1/svc/x").guard
    assert SECRET not in str(info.value)
    for record in caplog.records:
        assert SECRET not in record.getMessage()


@pytest.mark.parametrize("option", ["lease", "result_ttl", "wait_timeout", "min_backoff"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_presets_refuse_durations_that_are_not_finite(option: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=f"for option {option}: a finite number"):
        presets.at_least_once(**{option: value})
