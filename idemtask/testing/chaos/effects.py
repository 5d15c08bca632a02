"""How the chaos body does its side effect: ``plain`` (recorded in the ledger), inside an
``idemtask.step`` (``steps``), or as a row of a user table written through
``idemtask.sql.atomic`` (``sql``).

In ``plain`` and ``steps`` mode the effect is the ledger's ``effect`` entry, so a repeat is
two such entries for one key. In ``sql`` mode the effect is the committed row: the ledger
cannot be written in the database transaction, so the runner counts the rows per key in
the user table at the end instead. SQLAlchemy is imported only for ``sql`` mode.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import idemtask
from idemtask import context
from idemtask.testing.ledger import EffectLedger

if TYPE_CHECKING:
    from sqlalchemy import Engine, Table

MODES = ("plain", "steps", "sql")
#: The user table the ``sql`` body writes one row to per effect (no unique key: a repeat
#: shows as a second row).
TABLE = "idemtask_chaos_effects"
#: Seconds a SQLite writer waits for the write lock (a frozen holder keeps it while stopped).
SQLITE_BUSY_SECONDS = 60.0

_engines: dict[tuple[int, str], Engine] = {}


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'effects.sqlite'}"


def do_effect(ledger: EffectLedger, mode: str, fenced: bool, sql_url: str = "") -> None:
    """The body's side effect, and its write through the fencing token if ``fenced``, done
    the way ``mode`` says. The fenced write is a ledger entry in every mode: in ``steps``
    mode it is part of the step, in ``sql`` mode it stays outside the transaction."""
    if mode == "plain":
        _ledger_effects(ledger, fenced)
    elif mode == "steps":
        # Recorded under the key as the step ends: a later attempt replays it.
        idemtask.step("effect", _ledger_effects, ledger, fenced)
    elif mode == "sql":
        _write_row(sql_url)
        if fenced:
            ledger.fenced_effect()
    else:
        raise ValueError(f"effects mode {mode!r}; have {MODES}")


def _ledger_effects(ledger: EffectLedger, fenced: bool) -> None:
    ledger.effect()
    if fenced:
        ledger.fenced_effect()


def _write_row(url: str) -> None:
    from sqlalchemy.orm import Session

    from idemtask.sql import atomic

    execution = context.current()
    with Session(engine(url)) as session, atomic(session) as effect:
        if effect.replayed:
            return
        session.execute(
            effects_table().insert(),
            {"key": execution.key, "token": execution.fencing_token, "pid": os.getpid()},
        )
        effect.value = execution.fencing_token


@functools.cache
def effects_table() -> Table:
    """The user table, in metadata of its own (not idemtask's)."""
    from sqlalchemy import BigInteger, Column, Integer, MetaData, Table, Text

    return Table(
        TABLE,
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key", Text, nullable=False),
        Column("token", BigInteger, nullable=False),
        Column("pid", Integer, nullable=False),
    )


def engine(url: str) -> Engine:
    """This process's engine for ``url`` (never one inherited through a fork). SQLite gets a
    busy timeout, so that several worker processes wait for the write lock in turn."""
    found = _engines.get((os.getpid(), url))
    if found is None:
        from sqlalchemy import create_engine

        connect: dict[str, Any] = {}
        if url.startswith("sqlite"):
            connect["timeout"] = SQLITE_BUSY_SECONDS
        found = _engines[(os.getpid(), url)] = create_engine(url, connect_args=connect)
    return found


def prepare(url: str) -> None:
    """Create the effect table and the user table, empty (a run's keys repeat from one run
    to the next of the same seed); a SQLite file is put in WAL mode, so readers never wait
    for the writer."""
    from idemtask.sql import metadata

    eng = engine(url)
    if eng.dialect.name == "sqlite":
        with eng.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    table = effects_table()
    metadata.create_all(eng)
    table.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(table.delete())
        conn.execute(metadata.tables["idemtask_effects"].delete())


def rows_per_key(url: str) -> dict[str, int]:
    """How many rows the bodies' own writes left for each key."""
    from sqlalchemy import func, select

    table = effects_table()
    with engine(url).connect() as conn:
        rows = conn.execute(select(table.c.key, func.count()).group_by(table.c.key)).all()
    return {str(key): int(n) for key, n in rows}


def dispose() -> None:
    """Close this process's engines (the runner, at the end of a run)."""
    for (pid, url), eng in list(_engines.items()):
        if pid == os.getpid():
            eng.dispose()
            del _engines[(pid, url)]
