"""Django's transaction-aware enqueue for idempotent tasks.

Celery's Django fixup makes ``DjangoTask`` the app's task class unless the app names its
own, so ``task_cls=IdempotentTask`` would drop ``delay_on_commit``. ``IdempotentTask``
carries the same two methods itself: the call (its reservation included) happens when the
transaction commits, and a transaction that rolls back enqueues nothing and leaves no
record. Outside a transaction (autocommit) the call happens at once, as Django's
``on_commit`` does.
"""

from __future__ import annotations

import functools
from typing import Any


class OnCommit:
    """``delay_on_commit`` and ``apply_async_on_commit``, as Celery's ``DjangoTask`` has."""

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """``delay(*args, **kwargs)`` once the current database transaction commits."""
        from django.db import transaction  # type: ignore[import-untyped, import-not-found, unused-ignore]

        transaction.on_commit(functools.partial(self.delay, *args, **kwargs))  # type: ignore[attr-defined]

    def apply_async_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """``apply_async(*args, **kwargs)`` once the current database transaction commits."""
        from django.db import transaction  # type: ignore[import-untyped, import-not-found, unused-ignore]

        transaction.on_commit(functools.partial(self.apply_async, *args, **kwargs))  # type: ignore[attr-defined]
