"""``idemtask demo``: a real worker in this process, on the embedded store, no server needed.

The Dramatiq demo (the default) runs Dramatiq's ``StubBroker`` and a ``Worker``; the Celery
demo runs a Celery worker on kombu's ``memory://`` transport. Both print every guard decision
as it happens, then check the body ran once per order. The store is the in-process
``MemoryStore`` unless ``--redis URL`` names a real one.
"""

from __future__ import annotations

import importlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import click

from idemtask.errors import ConfigurationError
from idemtask.events import Decision, Event

LEASE = 1.0  # seconds: short, so the crash scenario's lease runs out quickly
#: The demos, by the extra (and the module) each needs, with the framework's name.
FRAMEWORKS = {"dramatiq": "Dramatiq", "celery": "Celery"}

#: One check the demo makes: what it promises, and whether it held.
Check = tuple[str, bool]


class Narrator:
    """Prints each guard decision as it happens and counts them."""

    def __init__(self) -> None:
        self.decisions: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if event.decision is Decision.RENEWED:
            return
        with self._lock:
            self.decisions[event.decision.value] += 1
        extra = ", ".join(
            f"{k}={v}" for k, v in event.fields.items() if k in ("token", "existing", "delay")
        )
        detail = f" ({extra})" if extra else ""
        click.secho(
            f"      idemtask: {event.decision.value:<10} message {event.task_id[:8]}{detail}",
            fg="cyan",
        )


def require_extra(module: str) -> None:
    """Stop with the install line when the framework a demo runs is not installed."""
    try:
        importlib.import_module(module)
    except ImportError:
        name = FRAMEWORKS[module]
        raise ConfigurationError(
            f"the {name} demo needs {name}: pip install 'idemtask[{module}]'"
        ) from None


def demo_settings(redis_url: str | None) -> dict[str, Any]:
    """idemtask settings for a demo: a short lease; a fresh key prefix on a real Redis."""
    settings: dict[str, Any] = {"lease": LEASE, "result_ttl": 600}
    if redis_url:
        settings["redis_url"] = redis_url
        settings["key_prefix"] = f"idemtask-demo-{uuid.uuid4().hex[:6]}"
    return settings


def step(title: str) -> None:
    click.secho(f"\n{title}", bold=True)


def summarize(narrator: Narrator, runs: Counter[int], checks: list[Check]) -> bool:
    """Print the decisions and the checks; True when every check held."""
    click.secho("\nSummary", bold=True)
    deliveries = sum(
        narrator.decisions[d] for d in ("acquired", "takeover", "replayed", "deferred")
    )
    click.echo(f"   deliveries seen by the guard: {deliveries}, body runs: {sum(runs.values())}")
    click.echo(
        "   decisions: " + ", ".join(f"{k}={v}" for k, v in sorted(narrator.decisions.items()))
    )
    for text, ok in checks:
        click.secho(f"   [{'ok' if ok else 'FAILED'}] {text}", fg="green" if ok else "red")
    return all(ok for _, ok in checks)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def installed_framework() -> str:
    """The framework a demo runs when none is named: the first of ``FRAMEWORKS`` installed."""
    for module in FRAMEWORKS:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return module
    extras = " or ".join(f"pip install 'idemtask[{module}]'" for module in FRAMEWORKS)
    raise ConfigurationError(f"the demo needs Dramatiq or Celery: {extras}")


def run_demo(redis_url: str | None = None, framework: str | None = None) -> bool:
    """Run the demo of ``framework`` (by default one installed); True when every check held."""
    framework = framework or installed_framework()
    if framework not in FRAMEWORKS:
        raise ConfigurationError(f"no demo for {framework!r}; choose {' or '.join(FRAMEWORKS)}")
    require_extra(framework)
    if framework == "celery":
        from idemtask.demo_celery import run_celery_demo

        return run_celery_demo(redis_url)
    from idemtask.demo_dramatiq import run_dramatiq_demo

    return run_dramatiq_demo(redis_url)
