"""``idemtask.sql.atomic`` in real Dramatiq worker processes: a worker SIGKILLed after the
database commit and before the Redis completion is replaced, and the redelivery finds the
committed effect row and returns its value: one payment row, not two."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from dramatiq_steps_app import payments, user_md
from sqlalchemy import create_engine, select

from idemtask.sql import metadata

pytestmark = [pytest.mark.dramatiq, pytest.mark.slow]


@pytest.fixture
def steps_app_env(tmp_path: Path) -> dict[str, str]:
    url = f"sqlite:///{tmp_path / 'shop.sqlite'}"
    engine = create_engine(url)
    metadata.create_all(engine)
    user_md.create_all(engine)
    engine.dispose()
    return {"IDT_SQL_URL": url}


def test_a_worker_killed_after_the_commit_leaves_one_row(
    steps_app: tuple[Any, Any], steps_app_env: dict[str, str]
) -> None:
    app, start = steps_app
    first = start()
    message = app.pay.send("o1")
    first.wait(60)  # the body kills its own worker after the commit
    assert first.returncode == -signal.SIGKILL
    start()
    result = message.get_result(block=True, timeout=60_000)
    engine = create_engine(steps_app_env["IDT_SQL_URL"])
    with engine.connect() as conn:
        rows = [tuple(row) for row in conn.execute(select(payments.c.order_id, payments.c.token))]
    engine.dispose()
    seen = {d: app.count(f"decision:{d}") for d in ("acquired", "takeover", "completed")}
    print(f"\nsql after SIGKILL: runs={app.count('runs:o1')} rows={rows} {seen}")
    assert app.count("runs:o1") == 2  # the killed run and the redelivered one
    assert rows == [("o1", 1)]  # one row, by the killed attempt
    assert result == 1  # its value, replayed from the effect row
    assert seen["takeover"] == 1 and seen["completed"] == 1
