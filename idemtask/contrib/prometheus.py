"""Prometheus metrics for every guard decision (``pip install idemtask[prometheus]``).

``install()`` once per process; the metrics then appear on the registry you expose. A
prefork Celery worker and a Dramatiq worker run tasks in several processes: they count in
``prometheus_client``'s multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), and one endpoint
serves the sum. ``celery_worker_metrics()`` sets that up for Celery; for Dramatiq, add
``idemtask.contrib.prometheus_dramatiq.IdempotencyMetrics`` after Dramatiq's own
``Prometheus`` middleware. ``DASHBOARD`` is the Grafana dashboard for these metrics.

``prometheus_client`` is imported only when a function here runs: it decides at import
whether it counts in multiprocess mode, and a worker sets that up after importing the app.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from idemtask.events import Decision, Event, add_observer, remove_observer

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Decisions that start a guarded attempt, and those that end one: their difference is the
#: number of leases a process holds.
_HOLD = frozenset({Decision.ACQUIRED, Decision.TAKEOVER})
_END = frozenset({Decision.COMPLETED, Decision.RELEASED, Decision.STALE_COMPLETION})
#: The Grafana dashboard (JSON) shipped with the package; its data source is a variable.
DASHBOARD = "grafana-dashboard.json"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class PrometheusMetrics:
    decisions: Counter
    guard_seconds: Histogram
    renewals: Counter
    renewal_seconds: Histogram
    leases_held: Gauge

    def __call__(self, event: Event) -> None:
        decision = event.decision
        if decision is Decision.RENEWED:
            self.renewals.inc()
            if event.duration is not None:
                self.renewal_seconds.observe(event.duration)
            return
        self.decisions.labels(task=event.task_name, decision=decision.value).inc()
        if event.duration is not None:
            self.guard_seconds.labels(decision=decision.value).observe(event.duration)
        if decision in _HOLD:
            self.leases_held.inc()
        elif decision in _END or (
            decision is Decision.STORE_UNAVAILABLE and event.fields.get("stage") == "finish"
        ):
            self.leases_held.dec()

    def collectors(self) -> tuple[Any, ...]:
        return (
            self.decisions,
            self.guard_seconds,
            self.renewals,
            self.renewal_seconds,
            self.leases_held,
        )


_installed: dict[int, PrometheusMetrics] = {}


def install(registry: CollectorRegistry | None = None) -> PrometheusMetrics:
    """Register the metrics on ``registry`` (the default one if None) and start counting."""
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram

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
        leases_held=Gauge(
            "idemtask_leases_held",
            "Leases held by running task bodies",
            registry=registry,
            multiprocess_mode="livesum",
        ),
    )
    _installed[id(registry)] = metrics
    add_observer(metrics)
    return metrics


def uninstall(registry: CollectorRegistry | None = None) -> None:
    from prometheus_client import REGISTRY

    registry = REGISTRY if registry is None else registry
    metrics = _installed.pop(id(registry), None)
    if metrics is not None:
        remove_observer(metrics)
        for collector in metrics.collectors():
            registry.unregister(collector)


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` from this process: the sum over every process of the worker in
    multiprocess mode, else this process's default registry."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(port, addr=addr, registry=registry)
    else:
        start_http_server(port, addr=addr)


def celery_worker_metrics(port: int = 9808, addr: str = "127.0.0.1") -> None:
    """A ``/metrics`` endpoint for a Celery worker, prefork pool included.

    Call it in the module that defines the app. The worker's main process serves the
    endpoint; every pool process counts its own decisions, and a process that exits is
    marked dead so its leases stop counting. Start the worker with
    ``PROMETHEUS_MULTIPROC_DIR`` set to an empty directory (and clear it at each start).
    """
    from celery import signals

    def serve_from_main_process(**_: Any) -> None:
        serve(port, addr)
        install()  # the solo and threads pools run tasks in the main process

    def count_in_pool_process(**_: Any) -> None:
        install()

    def mark_dead(**_: Any) -> None:
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    signals.worker_init.connect(serve_from_main_process, weak=False)
    signals.worker_process_init.connect(count_in_pool_process, weak=False)
    signals.worker_process_shutdown.connect(mark_dead, weak=False)


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard, as a dict (import it in Grafana, or provision the file)."""
    text = (resources.files("idemtask.contrib") / DASHBOARD).read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    return [
        target["expr"]
        for panel in dashboard()["panels"]
        for target in panel.get("targets", ())
        if target.get("expr")
    ]
