"""SIGKILL between the database commit and the Redis completion, with real processes: the
next attempt (a higher token, as a takeover gets) finds the committed effect row and does not
write again; a plain body writes once per attempt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from sqlalchemy import Engine

from sql_support import count

pytestmark = pytest.mark.slow

BODY = os.path.join(os.path.dirname(__file__), "crash_body.py")


def attempt_then_kill(engine: Engine, token: int, mode: str) -> None:
    url = engine.url.render_as_string(hide_password=False)
    proc = subprocess.Popen(
        [sys.executable, BODY, url, str(token), mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "committed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


@pytest.mark.parametrize(("mode", "writes"), [("atomic", 1), ("plain", 3)])
def test_sigkill_after_commit_repeats_no_database_effect(
    engine: Engine, mode: str, writes: int
) -> None:
    for token in (1, 2, 3):  # the first attempt and two takeovers, each killed after commit
        attempt_then_kill(engine, token, mode)
    print(f"\n{engine.dialect.name} {mode}: 3 attempts killed after commit, rows={count(engine)}")
    assert count(engine) == writes
