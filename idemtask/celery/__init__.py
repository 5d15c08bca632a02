"""Celery adapter: ``IdempotentTask``, ack-late ``presets`` and the ``check_app`` doctor."""

from __future__ import annotations

from idemtask.celery import presets
from idemtask.celery import revoked as _revoked  # noqa: F401 - connects Celery's task_revoked
from idemtask.celery.doctor import check_app
from idemtask.celery.startup import validate_app
from idemtask.celery.task import FINGERPRINT_HEADER, KEY_HEADER, IdempotentTask

__all__ = [
    "FINGERPRINT_HEADER",
    "KEY_HEADER",
    "IdempotentTask",
    "check_app",
    "presets",
    "validate_app",
]
