"""Worker start-up: validate every idempotent task's options before the first message, and
warn when the store cannot protect anything across processes or does not answer."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import worker_init, worker_ready

from idemtask.celery.config import CONF_NAME, app_settings, resolve_identity
from idemtask.errors import ConfigurationError
from idemtask.runtime import warn_if_unreachable, warn_if_unshared

logger = logging.getLogger("idemtask.celery")


def idempotent_tasks(app: Celery) -> list[Task]:
    """The app's registered IdempotentTask instances, sorted by name."""
    from idemtask.celery.task import IdempotentTask

    return sorted(
        (task for task in app.tasks.values() if isinstance(task, IdempotentTask)),
        key=lambda task: str(task.name),
    )


def validate_app(app: Celery) -> None:
    """Resolve the settings and every task's policy; one ConfigurationError lists them all."""
    settings = app_settings(app)
    problems: list[str] = []
    for task in idempotent_tasks(app):
        try:
            resolve_identity(task, settings)
        except ConfigurationError as err:
            problems.append(str(err))
    if problems:
        raise ConfigurationError("invalid idemtask configuration:\n  " + "\n  ".join(problems))


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or not idempotent_tasks(app):
        return  # an app in this process that does not use idemtask
    try:
        validate_app(app)
    except ConfigurationError as err:
        # Celery logs and swallows ordinary exceptions from signal handlers; a worker that
        # would fail every guarded task must not start. Its message is printed once, by the
        # interpreter on the way out (logging is not set up yet: a log call would print too).
        raise SystemExit(f"error: {err}") from err
    if not app.conf.task_always_eager:
        warn_if_unshared(app_settings(app), logger, where=f"in app.conf.{CONF_NAME}")


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Once, in the worker's main process, with its log set up (``worker_init`` is too early
    for ``--logfile``)."""
    app = getattr(sender, "app", None)
    if app is not None and idempotent_tasks(app) and not app.conf.task_always_eager:
        warn_if_unreachable(app_settings(app), logger)


worker_init.connect(_on_worker_init, weak=False, dispatch_uid="idemtask.celery.worker_init")
worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid="idemtask.celery.worker_ready")
