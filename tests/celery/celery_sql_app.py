"""The Celery test app plus a task that writes a payment row through ``idemtask.sql.atomic``
and, on its first run only, SIGKILLs its prefork child right after the commit: the effect is
in the database, the completion is not in Redis.

Built in-process by ``build_sql_app``, or for worker subprocesses (``celery -A
celery_sql_app worker``) from the ``ITEST_*`` variables of ``celery_testapp`` and
``ITEST_SQL_URL``, the database.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from celery import Celery
from celery_testapp import build_app, counter
from sqlalchemy import Column, Engine, Integer, MetaData, Table, Text, create_engine
from sqlalchemy.orm import Session

import idemtask
import idemtask.sql

user_md = MetaData()
payments = Table(
    "payments",
    user_md,
    Column("id", Integer, primary_key=True),
    Column("order_id", Text, nullable=False),
    Column("token", Integer, nullable=False),
)
_engines: dict[str, Engine] = {}


def engine(url: str) -> Engine:
    """One engine per process (the worker's children create their own after the fork)."""
    if url not in _engines:
        _engines[url] = create_engine(url)
    return _engines[url]


def build_sql_app(name: str, sql_url: str, **options: Any) -> Celery:
    app = build_app(name, **options)

    @app.task(shared=False, name="s.pay")
    def pay(order: str) -> int:
        client = counter()
        client.incr(f"runs:{order}")
        token = idemtask.current().fencing_token
        with Session(engine(sql_url)) as session, idemtask.sql.atomic(session) as effect:
            if not effect.replayed:
                session.execute(payments.insert().values(order_id=order, token=token))
                effect.value = token
        if client.incr(f"kill:{order}") == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # committed, not completed in Redis
        return int(effect.value)

    return app


def _from_environment() -> Celery | None:
    broker = os.environ.get("ITEST_BROKER")
    if not broker:
        return None
    return build_sql_app(
        "itest-sql",
        os.environ["ITEST_SQL_URL"],
        broker_url=broker,
        backend_url=os.environ["ITEST_BACKEND"],
        store_url=os.environ["ITEST_STORE"],
        counter_url=os.environ["ITEST_COUNTER"],
    )


app = _from_environment()
