"""``idemtask.step`` in real Dramatiq worker processes: a worker SIGKILLed between step 2
and step 3 is replaced, and the redelivery replays steps 1 and 2 and runs only step 3."""

from __future__ import annotations

import signal
from typing import Any

import pytest

pytestmark = [pytest.mark.dramatiq, pytest.mark.slow]


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
