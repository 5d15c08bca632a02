"""``Task.replace`` on an idempotent task: the replacement finishes the replaced call.

``replace`` publishes the replacement under the replaced task's id and ends the body with
``Ignore``. The attempt goes with it (in the replacement's headers): the replacement resumes
it and records its result under the replaced call too, so a duplicate of that call gets the
replacement's answer. Only a single idempotent task can take it; otherwise the key is given
back idle, as for any body that ends without an answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Task
from celery.canvas import Signature
from celery.exceptions import Ignore

from idemtask.celery import running
from idemtask.celery.config import task_identity
from idemtask.codecs import Codec
from idemtask.guard import Call, Delivery, Guard
from idemtask.identity import Handed, hand, handed


class HandsOverOnReplace(Task):  # type: ignore[misc]
    """The ``on_replace`` half of ``IdempotentTask``, and the resuming half it hands to."""

    def on_replace(self, sig: Any) -> Any:
        """Hand this attempt to the replacement (same task id), or give the key back."""
        delivery = running.delivery_of(self.request)
        attempt = delivery.attempt if delivery is not None else None
        target = self.app.tasks.get(getattr(sig, "task", None) or "")
        if attempt is None or self.request.is_eager or type(sig) is not Signature:
            return super().on_replace(sig)
        if not isinstance(target, HandsOverOnReplace) or task_identity(target) is None:
            return super().on_replace(sig)
        headers = dict(sig.options.get("headers") or {})
        hand(Handed(attempt.call, attempt.attempt_id, attempt.token), self.request.id, headers)
        sig.set(headers=headers)
        try:
            return super().on_replace(sig)
        except Ignore:  # published: the replacement resumes the attempt
            assert delivery is not None
            delivery.hand_over()
            raise

    def resumed(
        self, fields: Mapping[str, Any], message_id: str, guard: Guard, codec: Codec, own: Call
    ) -> Delivery | None:
        """The replaced call's delivery, resuming the attempt handed to this message."""
        given = handed(fields, message_id)
        replaced = self.app.tasks.get(given.call.task_name) if given is not None else None
        if given is None or not isinstance(replaced, HandsOverOnReplace) or given.call == own:
            return None
        identity = task_identity(replaced)
        if identity is None:
            return None
        resumes = (given.attempt_id, given.token)
        return guard.delivery(identity.policy, given.call, message_id, codec, resumes=resumes)
