"""idemtask.sql.atomic on SQLite and a real PostgreSQL server."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from idemtask import context
from idemtask.sql import StaleToken, atomic, metadata, run

from sql_support import as_attempt, count, payments, user_md


def pay(engine: Engine, token: int, fail: bool = False) -> object:
    ctx = context.activate(as_attempt(token))
    try:
        with Session(engine) as session, atomic(session) as effect:
            if effect.replayed:
                return effect.value
            session.execute(payments.insert().values(ref=f"by-{token}"))
            if fail:
                raise RuntimeError("boom")
            effect.value = {"receipt": token}
        return effect.value
    finally:
        context.deactivate(ctx)


def test_first_attempt_writes_row_and_effect(engine: Engine) -> None:
    assert pay(engine, 1) == {"receipt": 1}
    assert count(engine) == 1


def test_later_attempt_replays_without_writing(engine: Engine) -> None:
    pay(engine, 1)
    assert pay(engine, 2) == {"receipt": 1}
    assert count(engine) == 1


def test_stale_token_refused_and_rolled_back(engine: Engine) -> None:
    pay(engine, 5)
    ctx = context.activate(as_attempt(3))
    try:
        with Session(engine) as session:
            session.execute(payments.insert().values(ref="stale-before"))
            with pytest.raises(StaleToken), atomic(session):
                raise AssertionError("the block must not run")
            session.commit()
    finally:
        context.deactivate(ctx)
    assert count(engine) == 1


def test_raising_block_records_nothing(engine: Engine) -> None:
    with pytest.raises(RuntimeError):
        pay(engine, 1, fail=True)
    assert count(engine) == 0
    assert pay(engine, 2) == {"receipt": 2}
    assert count(engine) == 1


@pytest.mark.parametrize("first", [1, 2])
def test_concurrent_stale_and_new_attempt_on_postgres(postgres_url: str, first: int) -> None:
    """Two real connections both inside atomic: exactly one writes, whichever claims first."""
    eng = create_engine(postgres_url)
    metadata.drop_all(eng)
    user_md.drop_all(eng)
    metadata.create_all(eng)
    user_md.create_all(eng)
    claimed, release = threading.Event(), threading.Event()
    outcome: dict[int, object] = {}

    def attempt(token: int, hold: bool) -> None:
        ctx = context.activate(as_attempt(token))
        try:
            with Session(eng) as session, atomic(session) as effect:
                if hold:
                    claimed.set()
                    release.wait(10)
                if effect.replayed:
                    outcome[token] = ("replay", effect.value)
                    return
                session.execute(payments.insert().values(ref=f"by-{token}"))
                effect.value = token
            outcome[token] = ("wrote", token)
        except StaleToken:
            outcome[token] = ("stale", None)
        finally:
            context.deactivate(ctx)

    other = 3 - first
    holder = threading.Thread(target=attempt, args=(first, True))
    holder.start()
    assert claimed.wait(10)
    waiter = threading.Thread(target=attempt, args=(other, False))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "the second attempt must wait on the first one's row lock"
    release.set()
    holder.join(10)
    waiter.join(10)
    assert outcome[first] == ("wrote", first)
    assert outcome[other] == (("replay", 1) if first == 1 else ("stale", None))
    assert count(eng) == 1
    eng.dispose()


def test_run_calls_the_body_once_per_key(engine: Engine) -> None:
    calls: list[int] = []

    def body(session: Session) -> int:
        calls.append(1)
        session.execute(payments.insert().values(ref="run"))
        return 42

    for token in (1, 2):
        ctx = context.activate(as_attempt(token))
        try:
            with Session(engine) as session:
                assert run(session, body) == 42
        finally:
            context.deactivate(ctx)
    assert calls == [1]
    assert count(engine) == 1
