"""The end-to-end variants of each framework, apart from the frameworks themselves so the
report can name them without importing Celery or Dramatiq."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Variant:
    name: str
    target: str  # attribute of the framework's tasks/actors
    role: Literal["plain", "idemtask", "peer"]
    #: every call is sent a second time (shuffled, the queue still full): N duplicates
    duplicates: bool = False


CELERY_PLAIN = Variant("plain Task", "plain", "plain")
CELERY_IDEMPOTENT = Variant("IdempotentTask", "idem", "idemtask")
CELERY_DUPLICATES = Variant("IdempotentTask, every call twice", "idem", "idemtask", True)
CELERY_ONCE = Variant("celery-once QueueOnce", "once", "peer")
CELERY_SINGLETON = Variant("celery-singleton Singleton", "singleton", "peer")
CELERY = (CELERY_PLAIN, CELERY_IDEMPOTENT, CELERY_DUPLICATES, CELERY_ONCE, CELERY_SINGLETON)

DRAMATIQ_PLAIN = Variant("plain actor", "plain", "plain")
DRAMATIQ_IDEMPOTENT = Variant("IdempotencyMiddleware", "idem", "idemtask")
DRAMATIQ_DUPLICATES = Variant("IdempotencyMiddleware, every call twice", "idem", "idemtask", True)
DRAMATIQ = (DRAMATIQ_PLAIN, DRAMATIQ_IDEMPOTENT, DRAMATIQ_DUPLICATES)
