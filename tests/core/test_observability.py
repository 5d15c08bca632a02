"""Decisions read back from logs, Prometheus metrics and OpenTelemetry spans."""

from __future__ import annotations

import logging
import uuid

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from idemtask.codecs import JsonCodec
from idemtask.contrib import opentelemetry as otel
from idemtask.contrib import prometheus
from idemtask.guard import Call, Deferred, Guard
from idemtask.policy import Policy
from idemtask.store import RedisStore

POLICY = Policy(lease=0.3, result_ttl=60)


@pytest.fixture
def guard(redis_url: str) -> Guard:
    return Guard(RedisStore.from_url(redis_url))


def test_decisions_are_logged_with_structured_fields(
    guard: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    call = Call("shop.charge", uuid.uuid4().hex, "fp")
    with caplog.at_level(logging.INFO, logger="idemtask"):
        guard.reserve(POLICY, call, "t1")
        guard.reserve(POLICY, call, "t2")
        guard.run(POLICY, call, "t1", lambda: 1, JsonCodec())
        guard.run(POLICY, call, "t3", lambda: 2, JsonCodec())
    decisions = [r.__dict__["idemtask_decision"] for r in caplog.records]
    assert decisions == ["new", "duplicate", "acquired", "completed", "replayed"]
    dup = caplog.records[1]
    assert dup.__dict__["idemtask_fields"]["existing"] == "t1"
    assert dup.__dict__["idemtask_key"] == call.key
    assert "idemtask duplicate task=shop.charge id=t2" in dup.getMessage()


def test_prometheus_counters_and_histograms_move(guard: Guard) -> None:
    registry = CollectorRegistry()
    prometheus.install(registry)
    try:
        call = Call("shop.charge", uuid.uuid4().hex, "fp")
        guard.reserve(POLICY, call, "t1")
        guard.reserve(POLICY, call, "t2")
        guard.run(POLICY, call, "t1", lambda: 1, JsonCodec())
        guard.run(POLICY, call, "t3", lambda: 2, JsonCodec())
        attempt = guard.begin(POLICY, Call("slow", "k-" + call.key, ""), "s1")
        with guard.holding(attempt):  # type: ignore[arg-type]
            guard.leases.renew_now()
            with pytest.raises(Deferred):
                guard.begin(POLICY, Call("slow", "k-" + call.key, ""), "s2")

        def value(name: str, **labels: str) -> float:
            found = registry.get_sample_value(name, labels)
            return 0.0 if found is None else found

        for decision in ("new", "duplicate", "acquired", "completed", "replayed"):
            assert value("idemtask_decisions_total", task="shop.charge", decision=decision) == 1
        assert value("idemtask_decisions_total", task="slow", decision="deferred") == 1
        assert value("idemtask_guard_seconds_count", decision="acquired") >= 2
        assert value("idemtask_lease_renewals_total") >= 1
        assert value("idemtask_lease_renewal_seconds_count") >= 1
    finally:
        prometheus.uninstall(registry)


def test_opentelemetry_span_events(guard: Guard) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    otel.install()
    try:
        call = Call("shop.charge", uuid.uuid4().hex, "fp")
        with tracer.start_as_current_span("run shop.charge"):
            guard.run(POLICY, call, "t1", lambda: 1, JsonCodec())
        with tracer.start_as_current_span("run shop.charge again"):
            guard.run(POLICY, call, "t2", lambda: 2, JsonCodec())
    finally:
        otel.uninstall()
    first, second = exporter.get_finished_spans()
    assert [e.name for e in first.events] == ["idemtask.acquired", "idemtask.completed"]
    assert [e.name for e in second.events] == ["idemtask.replayed"]
    assert second.attributes is not None
    assert second.attributes["idemtask.decision"] == "replayed"
    assert second.attributes["idemtask.key"] == call.key
    assert second.events[0].attributes is not None
    assert second.events[0].attributes["idemtask.original"] == "t1"
