"""What Celery itself does with a call, for ``IdempotentTask`` to do the same: the checks it
runs before publishing, how it merges headers, which publishes belong to a canvas, how long
a message is held back, what handle a caller gets, and how a message is sent again."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, NoReturn

from celery import Task, states
from celery.exceptions import Ignore, Reject
from celery.result import AsyncResult, EagerResult
from celery.utils.time import maybe_iso8601
from kombu import serialization

from idemtask.celery.config import codec_for
from idemtask.errors import TaskFailedError
from idemtask.guard import Call, Existing
from idemtask.identity import count_deferrals
from idemtask.store.base import State

logger = logging.getLogger("idemtask.celery")

#: Options that make a publish part of a canvas (or a callback sent by a worker). Their task
#: ids are frozen in advance and something waits on each of them, so they are never
#: suppressed at enqueue: the execute guard replays the stored result under their own id.
_CANVAS_OPTIONS = ("chord", "group_id", "group_index", "chain", "parent_id")
_PRESENT_OPTIONS = ("chain",)  # a chain step sent with ``chain=[]`` is still a chain step
_dumps: Callable[..., Any] = serialization.dumps


def refuse_as_celery(
    task: Task,
    call: tuple[Any, Any],
    serializer: str | None,
    cause: BaseException | None,
) -> None:
    """Raise the error Celery raises before publishing ``call`` (args, kwargs), if any: its
    argument check (``typing``), the shapes ``send_task`` requires, the serializer. Asked
    whenever idemtask does not hand a call to Celery, so it fails exactly as on a plain task."""
    args, kwargs = call
    serializer = serializer or task.serializer
    try:
        if task.typing:
            task.__header__(*(args or ()), **(kwargs or {}))
        dump = task._dump_pydantic_arguments
        if dump is not None and serializer != "pickle":
            args, kwargs = dump(args, kwargs)
        if not task.app.conf.task_always_eager:  # eager Celery fails such a call later
            _check_shapes(args, kwargs)
        _dumps((args or (), kwargs or {}, {}), serializer)
    except Exception as refusal:
        raise refusal from cause


def _check_shapes(args: Any, kwargs: Any) -> None:
    """The checks (and messages) of Celery's ``AMQP.as_task_v2``, without building a message."""
    if not isinstance(args or (), (list, tuple)):
        raise TypeError("task args must be a list or tuple")
    if not isinstance(kwargs or {}, Mapping):
        raise TypeError("task keyword arguments must be a mapping")


def own_headers(given: Any, *, eager: bool) -> dict[str, Any] | None:
    """A copy of the caller's headers to carry the key in, merged as Celery merges them (and
    failing as Celery fails). None for eager Celery given headers of another shape: it hands
    them to the request as they are, so they are passed on untouched."""
    if eager and given is not None and not isinstance(given, Mapping):
        return None
    headers: dict[str, Any] = {}
    headers.update(given or {})
    return headers


def passes_through(link: Any, link_error: Any, options: Mapping[str, Any]) -> bool:
    """Canvas members, callbacks, retries and replacements are never suppressed at enqueue."""
    if link or link_error:
        return True
    if any(options.get(name) is not None for name in _CANVAS_OPTIONS):
        return True
    if any(name in options for name in _PRESENT_OPTIONS):
        return True
    return bool(options.get("replaced_task_nesting")) or int(options.get("retries") or 0) > 0


def delay_of(options: Mapping[str, Any]) -> float:
    """Seconds a ``countdown`` or ``eta`` holds the message back: its reservation lasts longer.

    An ``eta`` is read as Celery reads it: a datetime or an ISO 8601 string, naive meaning
    UTC (not the machine's local time)."""
    countdown = options.get("countdown")
    if countdown:
        return max(0.0, float(countdown))
    eta = options.get("eta")
    if isinstance(eta, str):
        try:
            eta = maybe_iso8601(eta)  # the parser Celery's worker reads an eta with
        except ValueError:
            return 0.0
    if isinstance(eta, datetime):
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=timezone.utc)
        return max(0.0, (eta - datetime.now(timezone.utc)).total_seconds())
    return 0.0


def existing_handle(task: Task, existing: Existing, call: Call) -> AsyncResult | EagerResult:
    """A handle to the original task. Eager apps get an EagerResult with the stored value,
    since eager mode normally leaves the result backend unused."""
    if not task.app.conf.task_always_eager:
        return task.AsyncResult(existing.task_id)
    if existing.state is State.DONE:
        value = None
        if existing.result is not None:
            value = codec_for(task.app).decode(existing.result.data)
        return EagerResult(existing.task_id, value, states.SUCCESS, name=task.name)
    if existing.state is State.FAILED:
        error = TaskFailedError(call.key, existing.task_id, "failed terminally")
        return EagerResult(existing.task_id, error, states.FAILURE, name=task.name)
    return EagerResult(existing.task_id, None, states.PENDING, name=task.name)


def defer(
    task: Task,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    delay: float,
    reason: str,
    deferrals: int | None = None,
) -> NoReturn:
    """Publish the running message again (same id, headers and ``retries``, so the user's
    retry budget is untouched) after ``delay`` seconds, then ack this copy unrecorded.
    ``deferrals`` (``Deferred.deferrals``) is carried in its headers.

    If that publish fails the message is rejected with requeue, so it is never lost.
    """
    request = task.request
    try:
        signature = task.signature_from_request(request, tuple(args), dict(kwargs), countdown=delay)
        headers = dict(signature.options.get("headers") or {})
        count_deferrals(deferrals, headers)
        signature.set(headers=headers)
        signature.apply_async()
    except Exception as exc:
        logger.warning(
            "idemtask: could not re-publish deferred task %s[%s] (%s); requeueing it",
            task.name,
            request.id,
            exc,
        )
        raise Reject(f"deferral failed: {exc}", requeue=True) from exc
    logger.info("idemtask: task %s[%s] deferred %.2fs: %s", task.name, request.id, delay, reason)
    raise Ignore(f"deferred: {reason}")
