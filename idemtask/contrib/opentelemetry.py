"""OpenTelemetry span events for every guard decision (``pip install idemtask[otel]``).

Each decision becomes an event ``idemtask.<decision>`` on the span that is current when it
is taken (the task span Celery's or Dramatiq's instrumentation opens), and the span gets
``idemtask.key`` and ``idemtask.decision`` attributes.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from idemtask.events import Decision, Event, add_observer, remove_observer


def _attribute(value: Any) -> str | int | float | bool:
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def record(event: Event) -> None:
    """The observer: add the decision to the current span, if one is recording."""
    if event.decision is Decision.RENEWED:
        return
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes: dict[str, str | int | float | bool] = {
        "idemtask.task": event.task_name,
        "idemtask.key": event.key,
        "idemtask.task_id": event.task_id,
    }
    attributes.update({f"idemtask.{k}": _attribute(v) for k, v in event.fields.items()})
    if event.duration is not None:
        attributes["idemtask.store_seconds"] = event.duration
    span.add_event(f"idemtask.{event.decision.value}", attributes)
    span.set_attribute("idemtask.key", event.key)
    span.set_attribute("idemtask.decision", event.decision.value)


def install() -> None:
    add_observer(record)


def uninstall() -> None:
    remove_observer(record)
