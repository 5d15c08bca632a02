"""The idemtask command against a real store: admin commands and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

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


def run(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), input=input)
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
        "error: cannot import no_such_module_xyz: ModuleNotFoundError: "
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
