"""Prometheus metrics for every guard decision (``pip install idemtask[prometheus]``).

``install()`` once per process; the metrics then appear on the registry you expose.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from idemtask.events import Decision, Event, add_observer, remove_observer

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class PrometheusMetrics:
    decisions: Counter
    guard_seconds: Histogram
    renewals: Counter
    renewal_seconds: Histogram

    def __call__(self, event: Event) -> None:
        if event.decision is Decision.RENEWED:
            self.renewals.inc()
            if event.duration is not None:
                self.renewal_seconds.observe(event.duration)
            return
        self.decisions.labels(task=event.task_name, decision=event.decision.value).inc()
        if event.duration is not None:
            self.guard_seconds.labels(decision=event.decision.value).observe(event.duration)


_installed: dict[int, PrometheusMetrics] = {}


def install(registry: CollectorRegistry | None = None) -> PrometheusMetrics:
    """Register the metrics on ``registry`` (the default one if None) and start counting."""
    registry = REGISTRY if registry is None else registry
    existing = _installed.get(id(registry))
    if existing is not None:
        return existing
    metrics = PrometheusMetrics(
        decisions=Counter(
            "idemtask_decisions",
            "Guard decisions by task and decision",
            ["task", "decision"],
            registry=registry,
        ),
        guard_seconds=Histogram(
            "idemtask_guard_seconds",
            "Time of the store round trip behind a guard decision",
            ["decision"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
        renewals=Counter("idemtask_lease_renewals", "Lease renewal round trips", registry=registry),
        renewal_seconds=Histogram(
            "idemtask_lease_renewal_seconds",
            "Time of one renewal round trip for every held lease",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
    )
    _installed[id(registry)] = metrics
    add_observer(metrics)
    return metrics


def uninstall(registry: CollectorRegistry | None = None) -> None:
    registry = REGISTRY if registry is None else registry
    metrics = _installed.pop(id(registry), None)
    if metrics is not None:
        remove_observer(metrics)
        for collector in (
            metrics.decisions,
            metrics.guard_seconds,
            metrics.renewals,
            metrics.renewal_seconds,
        ):
            registry.unregister(collector)
