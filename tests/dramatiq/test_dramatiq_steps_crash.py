"""``idemtask.step`` in real Dramatiq worker processes: a worker SIGKILLed between step 2
and step 3 is replaced, and the redelivery replays steps 1 and 2 and runs only step 3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dramatiq_helpers import wait_for

pytestmark = [pytest.mark.dramatiq, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture
def steps_app(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    base = redis_url.rsplit("/", 1)[0]
    env = {
        "IDT_BROKER_URL": f"{base}/2",
        "IDT_NAMESPACE": f"s{uuid.uuid4().hex[:10]}",
        "IDT_STORE_URL": f"{base}/1",
        "IDT_COUNTER_URL": f"{base}/15",
        "IDT_LEASE": "2.0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import dramatiq_steps_app

    app = dramatiq_steps_app.build()
    procs: list[subprocess.Popen[bytes]] = []
    log = open(  # noqa: SIM115 - closed below
        Path(os.environ.get("TMPDIR", "/tmp")) / f"{env['IDT_NAMESPACE']}.log", "wb"
    )

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "dramatiq_steps_app.py")],
            env={**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        ready = f"{env['IDT_NAMESPACE']}:ready:{proc.pid}"
        wait_for(lambda: proc.poll() is None and app.counters.exists(ready), 60, "worker up")
        return proc

    yield app, start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    log.close()
    app.broker.close()
    app.counters.close()


def test_a_worker_killed_after_step_two_resumes_at_step_three(
    steps_app: tuple[Any, Any],
) -> None:
    app, start = steps_app
    first = start()
    message = app.checkout.send("o1")
    first.wait(60)  # the body kills its own worker after step 2
    assert first.returncode == -signal.SIGKILL
    assert app.count("effect:o1:charge") == 1 and app.count("effect:o1:write") == 0
    start()
    result = message.get_result(block=True, timeout=60_000)
    effects = {name: app.count(f"effect:o1:{name}") for name in ("reserve", "charge", "write")}
    seen = {d: app.count(f"decision:{d}") for d in ("acquired", "takeover", "completed")}
    print(f"\nsteps after SIGKILL: runs={app.count('runs:o1')} effects={effects} {seen}")
    assert app.count("runs:o1") == 2  # the killed run and the redelivered one
    assert effects == {"reserve": 1, "charge": 1, "write": 1}  # 1 and 2 replayed, 3 ran once
    assert result == {"reserve": 1, "charge": 1, "write": 1}
    assert seen["takeover"] == 1 and seen["completed"] == 1
