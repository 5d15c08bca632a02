"""idemtask in a real Django project: settings.IDEMTASK read by the worker and by the CLI,
``delay_on_commit`` with a real SQLite database, and a rolled-back transaction that leaves
nothing. Django runs only in subprocesses, so this test process stays unconfigured."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from idemtask.store import RedisStore, State

from servers import terminate_session

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _db(url: str, number: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{number}"


@pytest.fixture
def project_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMTASK_")}
    env.update(
        DJANGO_SETTINGS_MODULE="djproject.settings",
        DJTEST_DB=str(tmp_path / "shop.sqlite3"),
        DJTEST_BROKER=_db(redis_url, 0),
        DJTEST_BACKEND=_db(redis_url, 1),
        DJTEST_STORE=_db(redis_url, 2),
        PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    run(env, sys.executable, "-m", "django", "migrate", "--run-syncdb", "-v", "0")
    return env


def run(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, env=env, cwd=HERE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture
def worker(project_env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "djproject", "worker", "--pool=prefork", "-c", "1",
        "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        f"--logfile={log}",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=project_env, cwd=HERE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (log.exists() and "ready." in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "worker did not start"
        time.sleep(0.1)
    yield log
    terminate_session(proc, grace=0)  # the test is over: no warm shutdown


def scenario(env: dict[str, str], outcome: str, order_id: int) -> dict[str, object]:
    done = run(env, sys.executable, "-m", "djproject.scenario", outcome, str(order_id))
    seen: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return seen


def order_status(env: dict[str, str], order_id: int) -> str | None:
    with sqlite3.connect(env["DJTEST_DB"]) as db:
        row = db.execute("SELECT status FROM shop_order WHERE id = ?", (order_id,)).fetchone()
    return None if row is None else str(row[0])


def test_delay_on_commit_reserves_when_the_transaction_commits(
    project_env: dict[str, str], worker: Path
) -> None:
    seen = scenario(project_env, "commit", 1)
    assert seen == {"key": seen["key"], "inside": False, "after": True, "orders": 1}
    store = RedisStore.from_url(project_env["DJTEST_STORE"])  # named only in settings.IDEMTASK
    deadline = time.monotonic() + 30
    while order_status(project_env, 1) != "shipped":
        assert time.monotonic() < deadline, worker.read_text()[-3000:]
        time.sleep(0.1)
    record = store.inspect(str(seen["key"]))
    assert record is not None and record.state is State.DONE and record.task_name == "shop.ship"
    store.client.close()


def test_a_rolled_back_transaction_leaves_no_record_and_no_message(
    project_env: dict[str, str], worker: Path
) -> None:
    seen = scenario(project_env, "rollback", 2)
    assert seen == {"key": seen["key"], "inside": False, "after": False, "orders": 0}
    time.sleep(1.0)  # a message, had one been sent, would have reached the idle worker
    assert "shop.ship" not in worker.read_text().split("ready.", 1)[1]
    store = RedisStore.from_url(project_env["DJTEST_STORE"])
    assert store.inspect(str(seen["key"])) is None
    store.client.close()


def test_the_cli_reads_settings_idemtask(project_env: dict[str, str], worker: Path) -> None:
    seen = scenario(project_env, "commit", 3)
    store = RedisStore.from_url(project_env["DJTEST_STORE"])
    deadline = time.monotonic() + 30
    while (record := store.inspect(str(seen["key"]))) is None or record.state is not State.DONE:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    store.client.close()
    done = run(project_env, sys.executable, "-m", "idemtask", "inspect", str(seen["key"]))
    assert "done" in done.stdout and "shop.ship" in done.stdout, done.stdout
