"""A message Celery revokes, or lets expire, before it runs gives back its reservation.

Celery acks such a message without calling the task, so no delivery ever decides it; the
``queued`` record its ``apply_async`` reserved would otherwise hand every duplicate call the
dead task's handle until ``reservation_ttl`` ends. A revoke that terminates a running body is
left to the lease, which ends on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery.signals import task_revoked


def _on_task_revoked(
    sender: Any = None, request: Any = None, terminated: bool = False, **_: Any
) -> None:
    from idemtask.celery.task import IdempotentTask

    if terminated or request is None or not isinstance(sender, IdempotentTask):
        return
    identity, guard = sender._guarded()
    task_id = getattr(request, "id", None)
    if identity is not None and isinstance(task_id, str):
        headers = getattr(request, "headers", None)
        guard.unreserve(identity, headers if isinstance(headers, Mapping) else None, task_id)


task_revoked.connect(_on_task_revoked, weak=False, dispatch_uid="idemtask.celery.task_revoked")
