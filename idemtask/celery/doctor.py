"""``check_app(app)``: the settings a worker of ``app`` will use, checked against what
at-least-once delivery with idemtask needs. One ``Finding`` per check, OK ones included.

It imports nothing of the user's: the caller (the CLI) imports the app first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import Celery, Task

from idemtask.celery import presets
from idemtask.celery.config import (
    BUILTIN_PREFIX,
    app_settings,
    check_task_class,
    defined_in,
    resolve_identity,
    task_options,
)
from idemtask.celery.startup import idempotent_tasks
from idemtask.config import Settings
from idemtask.doctor import check_store
from idemtask.errors import ConfigurationError
from idemtask.findings import Finding, Level
from idemtask.guard import STORE_RETRY_DELAY
from idemtask.policy import Policy

#: Brokers that emulate acks with a visibility timeout, and kombu's default for each.
_VISIBILITY_DEFAULTS = {
    "redis": 3600.0,
    "rediss": 3600.0,
    "redis+socket": 3600.0,
    "socket": 3600.0,
    "sentinel": 3600.0,
    "sqs": 1800.0,
}
_IN_PROCESS_BROKERS = ("memory", "cache+memory", "filesystem")


@dataclass(frozen=True, slots=True)
class _Guarded:
    task: Task
    policy: Policy


def check_app(app: Celery) -> list[Finding]:
    """Run every check on ``app.conf`` and the app's registered tasks."""
    try:
        settings = app_settings(app)
    except ConfigurationError as err:
        return [Finding(Level.ERROR, "celery.config", str(err), "fix app.conf.idemtask")]
    guarded, findings = _policies(app, settings)
    findings.append(_unguarded(app))
    conf = app.conf
    acks_late = bool(conf.task_acks_late)
    findings += [
        _acks_late(conf, guarded),
        _worker_lost(conf),
        _prefetch(conf, acks_late),
        _visibility(conf, guarded),
        *(_lease(item) for item in guarded),
        _result_expires(conf, guarded),
        _beat(conf, guarded),
        *_store(conf, settings),
        _preset(conf),
    ]
    return findings


def _tasks(app: Celery) -> tuple[list[Task], list[str]]:
    """The app's idempotent tasks; a class refused while the app finalizes (a misspelt
    option) is a problem to report, and the tasks registered before it are still checked."""
    try:
        return idempotent_tasks(app), []
    except ConfigurationError as err:
        return idempotent_tasks(app), [str(err)]


def _policies(app: Celery, settings: Settings) -> tuple[list[_Guarded], list[Finding]]:
    guarded: list[_Guarded] = []
    tasks, problems = _tasks(app)
    for task in tasks:
        try:
            check_task_class(type(task))
            identity = resolve_identity(task, settings)
        except ConfigurationError as err:
            problems.append(str(err))
            continue
        if identity is not None:
            guarded.append(_Guarded(task, identity.policy))
    if problems:
        finding = Finding(
            Level.ERROR, "celery.task_options", "; ".join(problems), "fix the task options"
        )
    elif not guarded:
        finding = Finding(
            Level.WARNING,
            "celery.task_options",
            "no task of this app is guarded",
            "@app.task(base=IdempotentTask, ...) or Celery(..., task_cls=IdempotentTask)",
        )
    else:
        finding = Finding(
            Level.OK,
            "celery.task_options",
            f"{len(guarded)} idempotent task(s), options valid",
        )
    return guarded, [finding]


def _given_options(task_class: type[Task]) -> dict[str, Any]:
    """``task_options`` without the names a class in the hierarchy defines as its own code
    (a method such as celery-singleton's ``Singleton.on_duplicate``): only values someone
    gave the task, through the decorator or as class attributes."""
    return {
        name: value
        for name, value in task_options(task_class).items()
        if not any(
            name in vars(cls) and defined_in(cls, vars(cls)[name]) for cls in task_class.__mro__
        )
    }


def _unguarded(app: Celery) -> Finding:
    """idemtask options on a task that is no ``IdempotentTask`` are kept as plain class
    attributes and never read: the task looks guarded and is not."""
    from idemtask.celery.task import IdempotentTask

    unguarded: list[str] = []
    for name, task in sorted(app.tasks.items()):
        if isinstance(task, IdempotentTask) or name.startswith(BUILTIN_PREFIX):
            continue
        options = _given_options(type(task))
        if options.get("idempotent") is False:
            del options["idempotent"]  # a plain task told to stay plain
        if options:
            unguarded.append(f"{name} ({', '.join(sorted(options))})")
    if unguarded:
        return Finding(
            Level.ERROR,
            "celery.unguarded",
            "these tasks set idemtask options but are not IdempotentTasks, so nothing guards "
            "them: " + ", ".join(unguarded),
            "@app.task(base=IdempotentTask, ...) or Celery(..., task_cls=IdempotentTask)",
        )
    return Finding(Level.OK, "celery.unguarded", "every task with idemtask options is guarded")


def _acks_late(conf: Any, guarded: list[_Guarded]) -> Finding:
    early = [str(item.task.name) for item in guarded if item.task.acks_late is False]
    if not conf.task_acks_late:
        return Finding(
            Level.ERROR,
            "celery.acks_late",
            "task_acks_late is False: messages are acked before the body runs, so a worker "
            "crash loses them (at-most-once); idemtask can only dedupe what is redelivered",
            "task_acks_late=True (presets.apply(app))",
        )
    if early:
        return Finding(
            Level.WARNING,
            "celery.acks_late",
            f"task_acks_late is True but these idempotent tasks set acks_late=False: "
            f"{', '.join(early)}",
            "remove acks_late=False from those tasks",
        )
    return Finding(Level.OK, "celery.acks_late", "task_acks_late=True")


def _worker_lost(conf: Any) -> Finding:
    retry = bool(conf.get("task_retry_on_worker_lost"))
    if conf.task_reject_on_worker_lost or retry:
        name = "task_retry_on_worker_lost" if retry else "task_reject_on_worker_lost"
        return Finding(Level.OK, "celery.worker_lost", f"{name}=True")
    return Finding(
        Level.WARNING,
        "celery.worker_lost",
        "neither task_reject_on_worker_lost nor task_retry_on_worker_lost is set: a pool "
        "child killed mid-task (OOM, SIGKILL) gets its message acked as failed, and the task "
        "is lost",
        "task_reject_on_worker_lost=True (idemtask's max_deliveries caps the loop)",
    )


def _prefetch(conf: Any, acks_late: bool) -> Finding:
    multiplier = int(conf.worker_prefetch_multiplier)
    if not acks_late or multiplier == 1:
        return Finding(Level.OK, "celery.prefetch", f"worker_prefetch_multiplier={multiplier}")
    return Finding(
        Level.WARNING,
        "celery.prefetch",
        f"worker_prefetch_multiplier={multiplier} with acks_late: each process holds "
        f"{multiplier} unacked messages, whose visibility clock runs while they wait, and "
        "a crash redelivers all of them",
        "worker_prefetch_multiplier=1",
    )


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def _broker_scheme(conf: Any) -> str:
    url = conf.broker_url or conf.get("broker_read_url") or ""
    url = str(url[0] if isinstance(url, (list, tuple)) else url)
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else "amqp"


def _visibility(conf: Any, guarded: list[_Guarded]) -> Finding:
    scheme = _broker_scheme(conf)
    default = _VISIBILITY_DEFAULTS.get(scheme)
    if default is None:
        return Finding(
            Level.OK,
            "celery.visibility_timeout",
            f"broker {scheme}:// has no visibility timeout (on RabbitMQ keep consumer_timeout "
            "longer than the longest task and countdown)",
        )
    options = conf.broker_transport_options or {}
    timeout = float(options.get("visibility_timeout", default))
    limits: list[tuple[str, float]] = []
    hard = _seconds(conf.task_time_limit)
    if hard is not None:
        limits.append(("task_time_limit", hard))
    for item in guarded:
        task, policy = item.task, item.policy
        limit = _seconds(task.time_limit)
        if limit is not None:
            limits.append((f"time_limit of {task.name}", limit))
        limits.append((f"lease of {task.name}", policy.lease))
        delay = _seconds(task.default_retry_delay)
        if delay is not None:
            limits.append((f"default_retry_delay of {task.name}", delay))
        if getattr(task, "retry_backoff", False):
            backoff_max = _seconds(getattr(task, "retry_backoff_max", 600))
            if backoff_max is not None:
                limits.append((f"retry_backoff_max of {task.name}", backoff_max))
    limits.append(("idemtask's store-unavailable deferral", STORE_RETRY_DELAY))
    too_long = [(name, value) for name, value in limits if value >= timeout]
    if too_long:
        listed = ", ".join(f"{name} ({value:g}s)" for name, value in too_long)
        return Finding(
            Level.WARNING,
            "celery.visibility_timeout",
            f"{scheme} visibility_timeout is {timeout:g}s, not longer than: {listed}. A message "
            "unacked for longer is delivered again while its first copy still runs or waits "
            "for its countdown (idemtask defers the copy, at the cost of extra deliveries)",
            "presets.apply(app, visibility_timeout=<longer than all of these>)",
        )
    if hard is None and not any(_seconds(item.task.time_limit) for item in guarded):
        return Finding(
            Level.WARNING,
            "celery.visibility_timeout",
            f"{scheme} visibility_timeout is {timeout:g}s but no task_time_limit bounds how "
            "long a task runs; a longer run is redelivered while it still runs",
            "set task_time_limit below the visibility timeout",
        )
    return Finding(
        Level.OK,
        "celery.visibility_timeout",
        f"{scheme} visibility_timeout {timeout:g}s exceeds every time limit, lease and "
        "known countdown",
    )


def _lease(item: _Guarded) -> Finding:
    task, policy = item.task, item.policy
    limit = _seconds(task.time_limit) or _seconds(task.app.conf.task_time_limit)
    code = "celery.lease"
    if limit is None:
        return Finding(
            Level.OK,
            code,
            f"{task.name}: lease {policy.lease:g}s, renewed every {policy.lease / 3:g}s while "
            "the body runs; after a crash a redelivery waits at most the lease",
        )
    if policy.lease > limit:
        return Finding(
            Level.WARNING,
            code,
            f"{task.name}: lease {policy.lease:g}s is longer than its hard time limit "
            f"{limit:g}s. Renewal already covers long runs, so a long lease only delays "
            "recovery: after a kill the key stays held for the full lease",
            f"lease <= {limit:g} for {task.name}",
        )
    return Finding(
        Level.OK,
        code,
        f"{task.name}: lease {policy.lease:g}s <= time limit {limit:g}s (renewal covers the "
        "rest of the run)",
    )


def _result_expires(conf: Any, guarded: list[_Guarded]) -> Finding:
    backend = str(conf.result_backend or "")
    ttls = [item.policy.result_ttl for item in guarded]
    if not ttls:
        return Finding(Level.OK, "celery.result_expires", "no idempotent task to compare")
    longest = max(ttls)
    if not backend or backend == "disabled":
        return Finding(
            Level.WARNING,
            "celery.result_expires",
            "no result_backend: a duplicate call gets AsyncResult(original id), whose .get() "
            "cannot return",
            "configure a result_backend, or use on_duplicate='raise'",
        )
    expires = _seconds(conf.result_expires)
    if expires is None or expires == 0 or expires >= longest:
        shown = "never" if not expires else f"{expires:g}s"
        return Finding(
            Level.OK,
            "celery.result_expires",
            f"result_expires {shown} >= longest idemtask result_ttl {longest:g}s",
        )
    return Finding(
        Level.WARNING,
        "celery.result_expires",
        f"result_expires {expires:g}s is shorter than the longest idemtask result_ttl "
        f"{longest:g}s: a duplicate call's AsyncResult(original id) can show PENDING forever "
        "once Celery dropped the original's result",
        f"result_expires >= {longest:g} (or a shorter result_ttl)",
    )


def _beat(conf: Any, guarded: list[_Guarded]) -> Finding:
    """A periodic task sends the same arguments every period: keyed by them alone, every run
    after the first replays the first one's result until ``result_ttl`` ends."""
    policies = {str(item.task.name): item.policy for item in guarded}
    schedule = conf.beat_schedule or {}
    deduped = sorted(
        f"{entry_name} ({entry.get('task')})"
        for entry_name, entry in schedule.items()
        if isinstance(entry, dict)
        and entry.get("task") in policies
        and not callable(policies[entry["task"]].idempotency_key)
    )
    if deduped:
        return Finding(
            Level.WARNING,
            "celery.beat",
            "these beat entries call idempotent tasks with the same arguments every period, "
            "so only the first run in each result_ttl executes: " + ", ".join(deduped),
            "idempotent=False for periodic tasks, or an idempotency_key callable that includes "
            "the period (e.g. the current date)",
        )
    return Finding(Level.OK, "celery.beat", "no beat entry is deduplicated across periods")


def _store(conf: Any, settings: Settings) -> list[Finding]:
    in_process = bool(conf.task_always_eager) or _broker_scheme(conf) in _IN_PROCESS_BROKERS
    return check_store(settings, in_process_broker=in_process)


def _preset(conf: Any) -> Finding:
    expected = presets.at_least_once(
        retry_on_worker_lost=bool(conf.get("task_retry_on_worker_lost")) or None
    )
    # The timeout's value is judged by celery.visibility_timeout; STARTED is a preference.
    ignored = set(presets.TRANSPORT_OPTION_SETTINGS) | {"task_track_started"}
    differing = sorted(
        name for name, value in expected.items() if name not in ignored and conf.get(name) != value
    )
    missing_timeout = [
        name
        for name in presets.TRANSPORT_OPTION_SETTINGS
        if "visibility_timeout" not in (conf.get(name) or {})
    ]
    if differing or missing_timeout:
        return Finding(
            Level.WARNING,
            "celery.preset",
            "the at-least-once preset is not applied; differing: "
            + ", ".join(_describe(conf, expected, differing, missing_timeout)),
            "presets.apply(app, visibility_timeout=...)",
        )
    return Finding(Level.OK, "celery.preset", "the at-least-once preset is applied")


def _describe(
    conf: Any, expected: dict[str, Any], differing: Iterable[str], missing: Iterable[str]
) -> list[str]:
    parts = [f"{name}={conf.get(name)!r} (preset: {expected[name]!r})" for name in differing]
    parts += [f"{name} has no visibility_timeout" for name in missing]
    return parts
