"""``idemtask.sql.atomic`` in a real Celery prefork worker: a child SIGKILLed after the
database commit and before the Redis completion is redelivered, and the redelivery finds the
committed effect row and returns its value: one payment row, not two."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery_sql_app import build_sql_app, payments, user_md
from celery_support import HERE, ROOT, Urls, wait_for
from celery_testapp import decisions
from sqlalchemy import create_engine, select

from idemtask.sql import metadata
from idemtask.store import RedisStore
from idemtask.store.base import State

from servers import terminate_session

pytestmark = [pytest.mark.celery, pytest.mark.slow]


@pytest.fixture
def sql_url(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'shop.sqlite'}"
    engine = create_engine(url)
    metadata.create_all(engine)
    user_md.create_all(engine)
    engine.dispose()
    yield url


@pytest.fixture
def sql_app(urls: Urls, sql_url: str, request: pytest.FixtureRequest) -> Iterator[Celery]:
    app = build_sql_app(
        request.node.name,
        sql_url,
        broker_url=urls.broker,
        backend_url=urls.backend,
        store_url=urls.store,
        counter_url=urls.counter,
    )
    yield app
    pending = getattr(app.backend, "_pending_results", None)
    if pending is not None:
        pending.concrete.clear()
    app.close()


@pytest.fixture
def sql_worker(urls: Urls, sql_url: str, tmp_path: Path) -> Iterator[Path]:
    """``celery -A celery_sql_app worker --pool=prefork``; yields the log's path."""
    log = tmp_path / "sql-worker.log"
    env = dict(os.environ)
    env.update(
        ITEST_BROKER=urls.broker,
        ITEST_BACKEND=urls.backend,
        ITEST_STORE=urls.store,
        ITEST_COUNTER=urls.counter,
        ITEST_SQL_URL=sql_url,
        PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")]),
    )
    command = [
        *(sys.executable, "-m", "celery", "-A", "celery_sql_app", "worker"),
        *("--pool=prefork", "-c", "2", "--loglevel=INFO", "--without-gossip"),
        *("--without-mingle", "--without-heartbeat", f"--logfile={log}"),
    ]
    proc = subprocess.Popen(command, env=env, cwd=HERE, start_new_session=True)
    try:
        wait_for(lambda: log.exists() and "ready." in log.read_text(), 30, "worker")
        yield log
    finally:
        terminate_session(proc, grace=0)  # the test is over: no warm shutdown


def test_a_child_killed_after_the_commit_leaves_one_row(
    sql_app: Celery, sql_worker: Path, sql_url: str, counter: redis.Redis, urls: Urls
) -> None:
    pay = sql_app.tasks["s.pay"]
    key = pay.idemtask_key(("o1",)).key
    result = pay.delay("o1")
    assert result.get(timeout=60) == 1  # the value token 1 committed, replayed
    engine = create_engine(sql_url)
    with engine.connect() as conn:
        rows = conn.execute(select(payments.c.order_id, payments.c.token)).all()
    engine.dispose()
    seen = decisions(counter, key)
    runs = int(counter.get("runs:o1") or 0)
    print(f"\nsql after SIGKILL: runs={runs} rows={rows} decisions={seen}")
    assert runs == 2  # the killed child's run and the redelivered one
    assert [tuple(row) for row in rows] == [("o1", 1)]  # one row, by the killed attempt
    assert seen["takeover"] == 1 and seen["completed"] == 1
    store = RedisStore.from_url(urls.store)
    record = store.inspect(key)
    store.client.close()
    assert record is not None and record.state is State.DONE
