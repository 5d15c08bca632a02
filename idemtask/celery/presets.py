"""Ack-late settings under which a crash means redelivery, which the guard makes safe.

``at_least_once()`` returns plain Celery settings; ``apply(app)`` merges them into
``app.conf`` without overwriting unrelated transport options. Each setting, and why:

``task_acks_late=True``
    Ack after the body returns, not before it starts: a worker that dies mid-task leaves the
    message unacked, so the broker delivers it again instead of losing it.
``task_reject_on_worker_lost=True`` (or ``task_retry_on_worker_lost=True``, Celery ≥ 5.7)
    When a pool child is SIGKILLed or OOM-killed, Celery otherwise acks the message as
    failed: lost work. Reject-with-requeue redelivers it; the retry variant re-sends it like
    ``retry()``, bounded by ``max_retries``. idemtask's ``max_deliveries`` caps either loop.
``task_acks_on_failure=True``, ``task_acks_on_timeout=True`` (Celery ≥ 5.7; before that
``task_acks_on_failure_or_timeout=True``)
    An exception or a hard time limit is final for that message: retries go through
    ``retry()``/``autoretry_for``, not through an endless requeue loop.
``worker_prefetch_multiplier=1``
    Each process holds only the message it runs. Prefetched messages sit unacked and the
    visibility clock of Redis/SQS runs for them too, so hoarding causes redeliveries.
``worker_cancel_long_running_tasks_on_connection_loss=True``
    After a broker connection loss the unacked messages of running tasks are redelivered;
    cancelling those tasks stops two copies running side by side (the default in Celery 6).
``task_track_started=True``
    The STARTED state tells a caller holding a duplicate's handle that the original runs.
``broker_transport_options`` / ``result_backend_transport_options`` ``visibility_timeout``
    Redis and SQS redeliver any message not acked within it, even while its first copy is
    still running or waiting for its ETA. idemtask defers such a copy, but the timeout should
    still exceed the longest run (hard time limit) and the longest countdown/ETA. Celery's docs
    ask for the same value in both dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import celery
from celery import Celery

from idemtask.errors import ConfigurationError
from idemtask.policy import check_seconds

_VERSION: tuple[int, int] = (int(celery.VERSION[0]), int(celery.VERSION[1]))
#: Celery 5.7 split task_acks_on_failure_or_timeout and added task_retry_on_worker_lost.
SPLIT_ACKS = _VERSION >= (5, 7)
TRANSPORT_OPTION_SETTINGS = ("broker_transport_options", "result_backend_transport_options")


def at_least_once(
    visibility_timeout: float = 3600,
    *,
    retry_on_worker_lost: bool | None = None,
    track_started: bool = True,
    prefetch_multiplier: int = 1,
) -> dict[str, Any]:
    """The settings, as a dict for ``app.conf.update``.

    ``visibility_timeout``: seconds; longer than the longest hard time limit and the longest
    countdown/ETA. ``retry_on_worker_lost``: None or False rejects with requeue when a pool
    child dies (every Celery version); True re-sends it as a retry (Celery ≥ 5.7 only).
    """
    check_seconds("visibility_timeout", visibility_timeout, source="presets.at_least_once")
    if visibility_timeout <= 0:
        raise ConfigurationError(f"visibility_timeout must be > 0, got {visibility_timeout}")
    if prefetch_multiplier < 1:
        raise ConfigurationError("prefetch_multiplier must be >= 1")
    if retry_on_worker_lost and not SPLIT_ACKS:
        raise ConfigurationError(
            "retry_on_worker_lost needs Celery >= 5.7 (task_retry_on_worker_lost); "
            f"this is Celery {celery.__version__}"
        )
    settings: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": not retry_on_worker_lost,
        "worker_prefetch_multiplier": prefetch_multiplier,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_track_started": track_started,
        "broker_transport_options": {"visibility_timeout": visibility_timeout},
        "result_backend_transport_options": {"visibility_timeout": visibility_timeout},
    }
    if SPLIT_ACKS:
        settings["task_retry_on_worker_lost"] = bool(retry_on_worker_lost)
        settings["task_acks_on_failure"] = True
        settings["task_acks_on_timeout"] = True
    else:
        settings["task_acks_on_failure_or_timeout"] = True
    return settings


def apply(app: Celery, visibility_timeout: float = 3600, **options: Any) -> dict[str, Any]:
    """Merge ``at_least_once`` into ``app.conf``; returns what was set.

    Transport option dicts are merged key by key, so other options already there (a Redis
    ``global_keyprefix``, SQS ``region``...) are kept.
    """
    settings = at_least_once(visibility_timeout, **options)
    for name in TRANSPORT_OPTION_SETTINGS:
        existing = app.conf.get(name) or {}
        if not isinstance(existing, Mapping):
            raise ConfigurationError(f"app.conf.{name} must be a dict")
        settings[name] = {**existing, **settings[name]}
    app.conf.update(settings)
    return settings
