"""The README's main job: the demo runs, and its checks hold, in-process and on Redis."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECKS = [
    "[ok] duplicate send returns the original message",
    "[ok] order 1 charged once",
    "[ok] redelivered completed message replayed, not run",
    "[ok] busy copy deferred, then replayed; order 3 charged once",
    "[ok] crashed holder taken over after its lease; order 4 charged once",
]


@pytest.mark.parametrize("on_redis", [False, True], ids=["memory", "redis"])
def test_demo_runs_and_every_check_holds(on_redis: bool, request: pytest.FixtureRequest) -> None:
    args = [sys.executable, "-m", "idemtask", "demo"]
    if on_redis:
        args += ["--redis", request.getfixturevalue("redis_url")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in CHECKS:
        assert line in out.stdout
    assert "FAILED" not in out.stdout
    assert "body runs: 3" in out.stdout
    assert "idemtask: takeover" in out.stdout and "idemtask: deferred" in out.stdout
    if on_redis:
        assert "store on redis://" in out.stdout
    else:
        assert "MemoryStore" in out.stdout
