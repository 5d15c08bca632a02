"""The ``idemtask`` command: inspect and forget records, count them, check a deployment, demo.

Bad input gets one clear line and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import click

from idemtask.config import Settings, resolve_settings
from idemtask.errors import IdempotencyError
from idemtask.findings import Finding, Level, at_or_above
from idemtask.redact import redact_text
from idemtask.runtime import open_store
from idemtask.store.base import Record, State, Store

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 2


class Fail(click.ClickException):
    """One line on stderr; a URL's password in the message is masked."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(redact_text(message))

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class Commands(click.Group):
    """click's own usage errors (a missing argument, an unknown option or command) as the
    same one ``error:`` line every other failure prints, not click's three-line block."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            # Not standalone: usage errors come out here, and an exit's status is returned.
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message().rstrip('.')}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(status if isinstance(status, int) else 0)


def friendly(fn: F) -> F:
    """Turn expected failures into one line (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug")
        try:
            return fn(*args, **kwargs)
        except Fail as exc:
            if debug and exc.__cause__ is not None:
                raise exc.__cause__ from None
            raise
        except (click.ClickException, click.Abort, click.exceptions.Exit, SystemExit):
            raise
        except Exception as exc:
            if debug:
                raise
            raise Fail(str(exc) if isinstance(exc, IdempotencyError) else _describe(exc)) from exc

    return wrapper  # type: ignore[return-value]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@click.group(cls=Commands)
@click.option(
    "--redis",
    "redis_url",
    help="Store URL (default: the app's settings, Django settings.IDEMTASK, then "
    "IDEMTASK_REDIS_URL).",
)
@click.option("--prefix", "key_prefix", help="Record key prefix (default: idemtask).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, key_prefix: str | None, debug: bool) -> None:
    """idemtask: idempotent Celery tasks and Dramatiq actors."""
    # No envvar on --redis: the environment is the lowest layer of settings, below an app's
    # and Django's, here as in a worker (resolve_settings reads it).
    explicit = {k: v for k, v in (("redis_url", redis_url), ("key_prefix", key_prefix)) if v}
    ctx.obj = explicit
    _setup_django()


def _setup_django() -> None:
    """Load Django settings when ``DJANGO_SETTINGS_MODULE`` names them, as ``manage.py``
    does (the project directory on the path), so ``settings.IDEMTASK`` applies here too."""
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return
    try:
        import django  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        django.setup()
    except Exception as exc:
        raise Fail(f"DJANGO_SETTINGS_MODULE is set but Django could not start: {exc}") from exc


def app_options(fn: F) -> F:
    """``-A/--celery MODULE:APP`` and ``--dramatiq MODULE:BROKER``: read the store settings
    from that app or broker, as its workers do."""
    fn = click.option(
        "--dramatiq",
        "dramatiq_broker",
        metavar="MODULE:BROKER",
        help="A Dramatiq broker whose IdempotencyMiddleware settings name the store.",
    )(fn)
    fn = click.option(
        "-A",
        "--celery",
        "celery_app",
        metavar="MODULE:APP",
        help="A Celery app whose app.conf.idemtask names the store.",
    )(fn)
    return fn


def _app_layer(
    celery_app: str | None, dramatiq_broker: str | None
) -> tuple[str, Mapping[str, Any]]:
    """The settings layer of the app or broker named on the command line, and its name."""
    if celery_app and dramatiq_broker:
        raise Fail("give --celery or --dramatiq, not both")
    if celery_app:
        from idemtask.celery.config import CONF_NAME, app_conf

        return f"app.conf.{CONF_NAME} of {celery_app}", app_conf(load_celery_app(celery_app))
    if dramatiq_broker:
        from idemtask.dramatiq import IdempotencyMiddleware

        broker = load_object(dramatiq_broker)
        ours = [m for m in broker.middleware if isinstance(m, IdempotencyMiddleware)]
        if not ours:
            raise Fail(f"{dramatiq_broker} has no IdempotencyMiddleware")
        return f"IdempotencyMiddleware of {dramatiq_broker}", ours[0].arguments
    return "framework config", {}


def _settings(
    ctx: click.Context, celery_app: str | None = None, dramatiq_broker: str | None = None
) -> Settings:
    """Explicit flags over the app's or broker's settings over Django over the environment."""
    name, layer = _app_layer(celery_app, dramatiq_broker)
    try:
        return resolve_settings(ctx.find_root().obj or {}, layer, framework_name=name)
    except IdempotencyError as exc:
        raise Fail(str(exc)) from exc


def _store(
    ctx: click.Context, celery_app: str | None = None, dramatiq_broker: str | None = None
) -> tuple[Store, Settings]:
    settings = _settings(ctx, celery_app, dramatiq_broker)
    if settings.uses_memory_store:
        given = celery_app or dramatiq_broker
        named = f"{given}'s settings name no redis_url; " if given else ""
        raise Fail(
            f"no store configured: {named}pass --redis redis://host:6379/0 or set "
            "IDEMTASK_REDIS_URL"
        )
    store = open_store(settings)
    store.ping()
    return store, settings


def record_key(name: str, prefix: str) -> str:
    """The key in ``name``: the bare key, or the record's name ``<prefix>:{<key>}`` as
    ``list`` and ``redis-cli`` show it."""
    head, brace, rest = name.partition(":{")
    if not brace or not rest.endswith("}"):
        return name
    if head != prefix:
        raise Fail(f"{name} is a record of prefix {head!r}, not {prefix!r}: pass --prefix {head}")
    return rest[:-1]


def _time(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def _record_lines(record: Record) -> Iterator[str]:
    yield f"key:          {record.key}"
    yield f"state:        {record.state.value}"
    yield f"task:         {record.task_name}"
    yield f"task id:      {record.task_id}"
    yield f"fencing token:{record.token:>2}"
    if record.state is State.RUNNING:
        yield f"holder:       {record.holder}"
        yield f"lease until:  {_time(record.lease_until_ms)}"
    yield f"deliveries:   {record.deliveries}"
    if record.result is not None:
        preview = record.result.data[:200].decode(errors="replace")
        yield f"result:       {preview} ({len(record.result.data)} bytes)"
    elif record.state is State.DONE:
        yield "result:       (not stored)"
    for name, data in record.steps.items():
        yield f"step:         {name} = {data[:200].decode(errors='replace')} ({len(data)} bytes)"
    if record.error:
        yield f"error:        {record.error}"
    yield f"created:      {_time(record.created_ms)}"
    yield f"updated:      {_time(record.updated_ms)}"
    yield f"expires in:   {record.ttl_ms / 1000:.0f}s"


@main.command()
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@app_options
@click.pass_context
@friendly
def inspect(
    ctx: click.Context,
    key: str,
    as_json: bool,
    celery_app: str | None,
    dramatiq_broker: str | None,
) -> None:
    """Show the record for KEY (the key, or the record's name PREFIX:{KEY})."""
    store, settings = _store(ctx, celery_app, dramatiq_broker)
    key = record_key(key, settings.key_prefix)
    record = store.inspect(key)
    if record is None:
        raise Fail(f"no record for key {key}")
    if as_json:
        click.echo(json.dumps(_record_dict(record), indent=2))
    else:
        for line in _record_lines(record):
            click.echo(line)


def _record_dict(record: Record) -> dict[str, Any]:
    return {
        "key": record.key,
        "state": record.state.value,
        "task_name": record.task_name,
        "task_id": record.task_id,
        "token": record.token,
        "holder": record.holder,
        "lease_until_ms": record.lease_until_ms,
        "deliveries": record.deliveries,
        "has_result": record.result is not None,
        "steps": {name: data[:200].decode(errors="replace") for name, data in record.steps.items()},
        "error": record.error,
        "created_ms": record.created_ms,
        "updated_ms": record.updated_ms,
        "ttl_ms": record.ttl_ms,
    }


@main.command(name="list")
@click.option("--task", "task_name", help="Only records of this task.")
@click.option(
    "--state",
    type=click.Choice([s.value for s in State]),
    help="Only records in this state.",
)
@click.option("--limit", default=100, show_default=True, help="Stop after this many records.")
@app_options
@click.pass_context
@friendly
def list_records(
    ctx: click.Context,
    task_name: str | None,
    state: str | None,
    limit: int,
    celery_app: str | None,
    dramatiq_broker: str | None,
) -> None:
    """List records (SCAN in batches; never KEYS)."""
    shown = 0
    store, _ = _store(ctx, celery_app, dramatiq_broker)
    for record in store.scan():
        if task_name and record.task_name != task_name:
            continue
        if state and record.state.value != state:
            continue
        click.echo(f"{record.key}  {record.state.value:<8} {record.task_name}  {record.task_id}")
        shown += 1
        if shown >= limit:
            click.echo(f"(stopped at --limit {limit})")
            break
    if shown == 0:
        click.echo("no records")


@main.command()
@click.argument("key")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@app_options
@click.pass_context
@friendly
def forget(
    ctx: click.Context,
    key: str,
    yes: bool,
    celery_app: str | None,
    dramatiq_broker: str | None,
) -> None:
    """Delete the record for KEY, so the next call runs the task again."""
    store, settings = _store(ctx, celery_app, dramatiq_broker)
    key = record_key(key, settings.key_prefix)
    record = store.inspect(key)
    if record is None:
        raise Fail(f"no record for key {key}")
    if record.state is State.RUNNING:
        click.echo(f"warning: {key} is running as {record.task_id}", err=True)
    if not yes:
        click.confirm(
            f"Forget {record.state.value} record {key} of {record.task_name}?", abort=True
        )
    store.forget(key)
    click.echo(f"forgot {key}")


@main.command()
@click.option("--sample", default=10_000, show_default=True, help="Read at most this many records.")
@app_options
@click.pass_context
@friendly
def stats(
    ctx: click.Context, sample: int, celery_app: str | None, dramatiq_broker: str | None
) -> None:
    """Count records by state and by task (sampled on large stores)."""
    by_state: Counter[str] = Counter()
    by_task: Counter[tuple[str, str]] = Counter()
    read = 0
    store, _ = _store(ctx, celery_app, dramatiq_broker)
    for record in store.scan():
        by_state[record.state.value] += 1
        by_task[(record.task_name, record.state.value)] += 1
        read += 1
        if read >= sample:
            break
    sampled = " (sampled: the first {read} records)" if read >= sample else ""
    click.echo(f"records: {read}{sampled.format(read=read)}")
    for state_name, count in sorted(by_state.items()):
        click.echo(f"  {state_name:<8} {count}")
    if by_task:
        click.echo("by task:")
        for (task, state_name), count in sorted(by_task.items()):
            click.echo(f"  {task}  {state_name:<8} {count}")


def load_object(spec: str) -> Any:
    """Import ``module:attribute`` (or ``module.attribute``) as a worker would."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise Fail(f"expected module:attribute, got {spec!r}")
    sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise Fail(f"cannot import {module_name}: {_describe(exc)}") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise Fail(f"{module_name} has no attribute {attr}") from None
    return obj


def load_celery_app(spec: str) -> Any:
    """The Celery app ``-A`` names, found as Celery's own ``-A`` finds it: ``proj`` (its
    ``app`` or ``celery`` attribute, or ``proj.celery``'s), ``proj.module`` or ``module:app``."""
    from celery.app.utils import find_app

    sys.path.insert(0, "")
    try:
        return find_app(spec)
    except Exception as exc:
        raise Fail(f"cannot load the Celery app {spec!r}: {_describe(exc)}") from exc


def print_findings(findings: list[Finding]) -> None:
    colors = {Level.OK: "green", Level.WARNING: "yellow", Level.ERROR: "red"}
    for finding in findings:
        click.secho(str(finding), fg=colors[finding.level])
    errors = sum(f.level is Level.ERROR for f in findings)
    warnings = sum(f.level is Level.WARNING for f in findings)
    click.echo(f"{len(findings)} checks: {errors} errors, {warnings} warnings")


@main.command()
@click.option("-A", "--celery", "celery_app", metavar="MODULE:APP", help="A Celery app to check.")
@click.option(
    "--dramatiq", "dramatiq_broker", metavar="MODULE:BROKER", help="A Dramatiq broker to check."
)
@click.option(
    "--fail-level",
    type=click.Choice([Level.ERROR.value, Level.WARNING.value]),
    default=Level.ERROR.value,
    show_default=True,
    help="Exit 1 when a finding at or above this level exists.",
)
@click.pass_context
@friendly
def doctor(
    ctx: click.Context, celery_app: str | None, dramatiq_broker: str | None, fail_level: str
) -> None:
    """Check the settings a worker will really use; exit 1 on errors (see --fail-level)."""
    if not celery_app and not dramatiq_broker:
        raise Fail("give --celery module:app or --dramatiq module:broker")
    findings: list[Finding] = []
    if celery_app:
        from idemtask.celery import check_app

        findings += check_app(load_celery_app(celery_app))
    if dramatiq_broker:
        from idemtask.dramatiq import check_broker

        findings += check_broker(load_object(dramatiq_broker))
    print_findings(findings)
    if at_or_above(findings, Level(fail_level)):
        ctx.exit(1)


@main.command()
@click.option(
    "--dramatiq",
    "framework",
    flag_value="dramatiq",
    help="A Dramatiq StubBroker and Worker (the default when Dramatiq is installed).",
)
@click.option("--celery", "framework", flag_value="celery", help="A Celery worker in-process.")
@click.option("--redis", "redis_url", help="Run on this Redis instead of the in-process store.")
@click.pass_context
@friendly
def demo(ctx: click.Context, framework: str | None, redis_url: str | None) -> None:
    """Watch idemtask decide: duplicates, a replay, a busy copy, a crash and a takeover."""
    from idemtask.demo import run_demo

    ok = run_demo(redis_url or (ctx.find_root().obj or {}).get("redis_url"), framework)
    if not ok:
        ctx.exit(1)
