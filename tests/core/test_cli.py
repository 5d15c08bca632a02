"""The idemtask command against a real store: admin commands and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from idemtask.cli import main
from idemtask.store import RedisStore

from servers import RedisServer


@pytest.fixture
def filled(redis_url: str) -> RedisStore:
    store = RedisStore.from_url(redis_url)
    common = {"task_name": "shop.charge", "fingerprint": "", "max_deliveries": 5}
    for i in range(3):
        out = store.acquire(
            f"done{i}", task_id=f"t{i}", attempt_id="a", lease_ms=1000, ttl_ms=60_000, **common
        )
        store.complete(
            f"done{i}", attempt_id="a", token=out.token, result=b'{"ok":true}', result_ttl_ms=60_000
        )
    store.acquire("busy", task_id="tb", attempt_id="b", lease_ms=60_000, ttl_ms=60_000, **common)
    store.reserve(
        "mail",
        task_id="tm",
        task_name="mail.send",
        fingerprint="",
        reservation_ms=60_000,
        ttl_ms=60_000,
    )
    return store


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), input=input, env=env)
    return result.exit_code, result.output


def test_inspect_shows_the_record(filled: RedisStore, redis_url: str) -> None:
    code, out = run("--redis", redis_url, "inspect", "done1")
    assert code == 0
    assert "state:        done" in out and "task id:      t1" in out
    assert '{"ok":true} (11 bytes)' in out
    code, out = run("--redis", redis_url, "inspect", "busy", "--json")
    assert code == 0 and '"state": "running"' in out and '"holder": "b"' in out


def test_list_filters_by_task_and_state(filled: RedisStore, redis_url: str) -> None:
    code, out = run("--redis", redis_url, "list", "--state", "done")
    assert code == 0 and sorted(line.split()[0] for line in out.splitlines()) == [
        "done0",
        "done1",
        "done2",
    ]
    code, out = run("--redis", redis_url, "list", "--task", "mail.send")
    assert code == 0 and out.split()[:3] == ["mail", "queued", "mail.send"]
    code, out = run("--redis", redis_url, "list", "--limit", "2")
    assert "(stopped at --limit 2)" in out and len(out.splitlines()) == 3


def test_forget_asks_unless_yes(filled: RedisStore, redis_url: str) -> None:
    code, _ = run("--redis", redis_url, "forget", "done0", input="n\n")
    assert code == 1 and filled.inspect("done0") is not None
    code, out = run("--redis", redis_url, "forget", "done0", input="y\n")
    assert code == 0 and filled.inspect("done0") is None
    code, out = run("--redis", redis_url, "forget", "done1", "--yes")
    assert code == 0 and "forgot done1" in out and filled.inspect("done1") is None


def test_stats_counts_by_state_and_task(filled: RedisStore, redis_url: str) -> None:
    code, out = run("--redis", redis_url, "stats")
    assert code == 0
    assert "records: 5" in out
    assert "  done     3" in out and "  running  1" in out and "  queued   1" in out
    assert "  shop.charge  done     3" in out
    code, out = run("--redis", redis_url, "stats", "--sample", "2")
    assert "records: 2 (sampled: the first 2 records)" in out


def test_bad_input_is_one_line_and_non_zero(
    redis_url: str, fresh_redis: Callable[..., RedisServer]
) -> None:
    code, out = run("--redis", redis_url, "inspect", "nope")
    assert code == 2 and out.strip() == "error: no record for key nope"
    down = fresh_redis()
    url = down.url
    down.stop()
    code, out = run("--redis", url, "inspect", "x")
    assert code == 2 and out.startswith("error: idempotency store unreachable")
    assert len(out.strip().splitlines()) == 1
    code, out = run("--redis", "http://nope", "list")
    assert code == 2 and "redis_url must be a redis://" in out
    code, out = run("inspect", "x")
    assert code == 2 and "no store configured" in out
    code, out = run("doctor", "--celery", "no_such_module_xyz:app")
    assert code == 2 and out.strip() == (
        "error: cannot load the Celery app 'no_such_module_xyz:app': ModuleNotFoundError: "
        "No module named 'no_such_module_xyz'"
    )


def test_installed_entry_point_and_debug_traceback(redis_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "idemtask", "--redis", redis_url, "inspect", "missing"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: no record for key missing"
    debug = subprocess.run(
        [sys.executable, "-m", "idemtask", "--debug", "doctor", "--celery", "nope_mod:app"],
        capture_output=True,
        text=True,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["inspect"], "Missing argument 'KEY' (see"),
        (["stats", "--bogus"], "No such option '--bogus'"),
        (["no-such-command"], "No such command 'no-such-command'"),
        (["doctor", "--fail-level", "info"], "Invalid value for '--fail-level'"),
        (["--bogus", "stats"], "No such option '--bogus'"),
    ],
)
def test_a_usage_error_is_one_error_line_too(args: list[str], says: str) -> None:
    """click's own usage errors read like every other failure: one ``error:`` line naming
    the problem and where the help is, exit status 2, nothing on stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "idemtask", *args], capture_output=True, text=True, timeout=60
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and done.stdout == "", done
    assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), done.stderr
    assert "--help" in lines[0], done.stderr


def _record(store: RedisStore, key: str) -> None:
    out = store.acquire(
        key,
        task_id=f"task-{key}",
        attempt_id="a",
        task_name="shop.charge",
        fingerprint="",
        lease_ms=1000,
        ttl_ms=60_000,
        max_deliveries=5,
    )
    store.complete(key, attempt_id="a", token=out.token, result=b"1", result_ttl_ms=60_000)


@pytest.fixture
def app_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str, request: pytest.FixtureRequest
) -> str:
    """Modules ``<tag>_celery:app`` and ``<tag>_dramatiq:broker`` in the current directory,
    whose idemtask settings name the store at ``redis_url`` under the prefix ``<tag>``."""
    tag = f"app{abs(hash(request.node.name)) % 10**8}"
    (tmp_path / f"{tag}_celery.py").write_text(
        "from celery import Celery\n"
        "app = Celery('shop', broker='memory://', set_as_current=False)\n"
        f"app.conf.idemtask = {{'redis_url': {redis_url!r}, 'key_prefix': {tag!r}}}\n"
    )
    (tmp_path / f"{tag}_dramatiq.py").write_text(
        "from dramatiq.brokers.stub import StubBroker\n"
        "from dramatiq.middleware import Retries\n"
        "from idemtask.dramatiq import IdempotencyMiddleware\n"
        "broker = StubBroker()\n"
        f"broker.add_middleware(IdempotencyMiddleware({redis_url!r}, key_prefix={tag!r}),"
        " before=Retries)\n"
    )
    (tmp_path / f"{tag}_memory.py").write_text(
        "from celery import Celery\n"
        "app = Celery('shop', broker='memory://', set_as_current=False)\n"
    )
    monkeypatch.chdir(tmp_path)
    return tag


@pytest.mark.celery
@pytest.mark.dramatiq
def test_store_commands_read_the_store_from_an_app_or_broker(
    app_modules: str, redis_url: str
) -> None:
    tag = app_modules
    _record(RedisStore.from_url(redis_url, prefix=tag), "k1")
    _record(RedisStore.from_url(redis_url), "other")  # the default prefix: not the app's
    sources = (
        ["-A", f"{tag}_celery:app"],
        ["-A", f"{tag}_celery"],  # as Celery's own -A: the module's ``app``
        ["--dramatiq", f"{tag}_dramatiq:broker"],
    )
    for source in sources:
        code, out = run("list", *source)
        assert code == 0 and out.split()[:2] == ["k1", "done"], out
        assert len(out.splitlines()) == 1
        code, out = run("stats", *source)
        assert code == 0 and "records: 1" in out, out
        code, out = run("inspect", "k1", *source)
        assert code == 0 and "task id:      task-k1" in out, out
    code, out = run("--prefix", "idemtask", "list", "--celery", f"{tag}_celery:app")
    assert code == 0 and out.split()[:2] == ["other", "done"], out  # the flag outranks the app
    code, out = run("forget", "k1", "--yes", "-A", f"{tag}_celery:app")
    assert code == 0 and out.strip() == "forgot k1"
    code, out = run("inspect", "k1", "-A", f"{tag}_celery:app")
    assert code == 2 and out.strip() == "error: no record for key k1"


@pytest.mark.celery
def test_store_commands_say_when_the_app_names_no_store(app_modules: str) -> None:
    code, out = run("list", "-A", f"{app_modules}_memory:app")
    assert code == 2 and out.strip() == (
        f"error: no store configured: {app_modules}_memory:app's settings name no redis_url; "
        "pass --redis redis://host:6379/0 or set IDEMTASK_REDIS_URL"
    )
    code, out = run("list", "-A", f"{app_modules}_memory:app", "--dramatiq", "x:broker")
    assert code == 2 and out.strip() == "error: give --celery or --dramatiq, not both"


def test_inspect_and_forget_take_the_record_name(filled: RedisStore, redis_url: str) -> None:
    code, out = run("--redis", redis_url, "inspect", "idemtask:{done1}")
    assert code == 0 and "key:          done1" in out, out
    code, out = run("--redis", redis_url, "inspect", "shop:{done1}")
    assert code == 2 and out.strip() == (
        "error: shop:{done1} is a record of prefix 'shop', not 'idemtask': pass --prefix shop"
    )
    code, out = run("--redis", redis_url, "forget", "--yes", "idemtask:{done2}")
    assert code == 0 and out.strip() == "forgot done2" and filled.inspect("done2") is None


@pytest.mark.celery
def test_the_environment_ranks_below_the_flag_and_the_app(
    app_modules: str, redis_url: str, fresh_redis: Callable[..., RedisServer]
) -> None:
    """As docs/configuration.md orders the layers: --redis > app settings > environment."""
    tag = app_modules
    other = fresh_redis()
    _record(RedisStore.from_url(redis_url, prefix=tag), "in-app-store")
    _record(RedisStore.from_url(other.url, prefix=tag), "in-env-store")
    env = {"IDEMTASK_REDIS_URL": other.url, "IDEMTASK_KEY_PREFIX": tag}
    code, out = run("list", "-A", f"{tag}_celery:app", env=env)
    assert code == 0 and out.split()[0] == "in-app-store", out
    code, out = run("--redis", other.url, "list", "-A", f"{tag}_celery:app", env=env)
    assert code == 0 and out.split()[0] == "in-env-store", out
    code, out = run("list", env=env)  # nothing above it: the environment names the store
    assert code == 0 and out.split()[0] == "in-env-store", out


def test_django_settings_rank_above_the_environment(
    tmp_path: Path, redis_url: str, fresh_redis: Callable[..., RedisServer]
) -> None:
    other = fresh_redis()
    _record(RedisStore.from_url(redis_url), "in-django-store")
    _record(RedisStore.from_url(other.url), "in-env-store")
    (tmp_path / "cli_django_settings.py").write_text(
        f"SECRET_KEY = 'x'\nINSTALLED_APPS = []\nIDEMTASK = {{'redis_url': {redis_url!r}}}\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "cli_django_settings",
        "IDEMTASK_REDIS_URL": other.url,
    }
    out = subprocess.run(
        [sys.executable, "-m", "idemtask", "list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split()[0] == "in-django-store"


DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_docs_show_the_real_help() -> None:
    text = DOCS.read_text()
    start = text.index("```text\n$ idemtask --help\n") + len("```text\n$ idemtask --help\n")
    shown = text[start : text.index("```", start)]
    real = CliRunner().invoke(main, ["--help"], prog_name="idemtask", terminal_width=80)
    assert real.output == shown


def _documented_options(section: str) -> list[str]:
    """The long option names in the first table of a section of docs/cli.md, in order."""
    text = DOCS.read_text()
    body = text[text.index(f"## `{section}") :]
    table = body[body.index("| option |") :].split("\n\n")[0]
    names = []
    for row in table.splitlines()[2:]:
        first = row.split("|")[1]
        names.append(next(word for word in first.replace("`", " ").split() if word[:2] == "--"))
    return names


@pytest.mark.parametrize(
    "command,section",
    [
        ("inspect", "idemtask inspect KEY"),
        ("list", "idemtask list"),
        ("forget", "idemtask forget KEY"),
        ("stats", "idemtask stats"),
        ("doctor", "idemtask doctor"),
        ("demo", "idemtask demo"),
    ],
)
def test_docs_list_each_commands_options_in_the_real_order(command: str, section: str) -> None:
    params = main.commands[command].params  # type: ignore[attr-defined]
    real = [
        next(o for o in p.opts if o.startswith("--")) for p in params if isinstance(p, click.Option)
    ]
    assert _documented_options(section) == real
