"""``atomic(session)``: claim the key's effect row first in the user's transaction, record the
value last; a committed row means done, a row with a newer token means this attempt is stale.

The claim is an upsert that only takes over a row whose token is lower than ours, so on
Postgres (READ COMMITTED) a second attempt waits on the row lock of the first and re-checks
the committed row when it wakes; on SQLite the write lock serialises whole transactions.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from idemtask.codecs import Codec, JsonCodec
from idemtask.context import Execution, current
from idemtask.sql.schema import effects_table

T = TypeVar("T")

_UNSET: Any = object()


class StaleToken(RuntimeError):
    """A newer attempt holds or has done the key's effect; this attempt's writes roll back."""


@dataclass(slots=True)
class Effect:
    """What the block sees: ``replayed`` with the recorded ``value``, or set ``value``."""

    key: str
    token: int
    replayed: bool
    value: Any = field(default=_UNSET)


def _upsert(session: Session, execution: Execution) -> Any:
    values = {
        "key": execution.key,
        "token": execution.fencing_token,
        "task_name": execution.task_name,
        "value": None,
        "created_at": datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None),
    }
    table = effects_table
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table)
    else:
        raise ValueError(f"idemtask.sql supports postgresql and sqlite, not {dialect!r}")
    stmt = stmt.values(**values)
    return stmt.on_conflict_do_update(
        index_elements=[table.c.key],
        set_={"token": stmt.excluded.token, "task_name": stmt.excluded.task_name},
        where=(table.c.token < stmt.excluded.token) & table.c.value.is_(None),
    )


def _claim(session: Session, execution: Execution, codec: Codec) -> Effect:
    """Take the key's row for this token, or find it done (replay) or newer (stale)."""
    session.execute(_upsert(session, execution))
    row = session.execute(
        select(effects_table.c.token, effects_table.c.value).where(
            effects_table.c.key == execution.key
        )
    ).one()
    key, token = execution.key, execution.fencing_token
    if row.token > token:
        raise StaleToken(f"effect for {key!r} belongs to token {row.token}, not {token}")
    if row.value is not None:
        return Effect(key, token, replayed=True, value=codec.decode(row.value))
    if row.token != token:  # pragma: no cover - the upsert above took any lower token
        raise StaleToken(f"effect for {key!r} could not be claimed by token {token}")
    return Effect(key, token, replayed=False)


def _record(session: Session, effect: Effect, codec: Codec) -> None:
    value = None if effect.value is _UNSET else effect.value
    result: Any = session.execute(
        update(effects_table)
        .where(effects_table.c.key == effect.key, effects_table.c.token == effect.token)
        .values(value=codec.encode(value))
    )
    if result.rowcount != 1:
        raise StaleToken(f"effect for {effect.key!r} was taken from token {effect.token}")


@contextmanager
def atomic(session: Session, *, codec: Codec | None = None) -> Iterator[Effect]:
    """Run the block in one transaction with the key's effect row. If ``effect.replayed``, the
    block must skip its writes and return ``effect.value``; otherwise set ``effect.value``.

    Begins (and commits) the session's transaction unless one is already open, in which
    case committing stays with the caller; any exception rolls the transaction back."""
    used = codec or JsonCodec()
    execution = current()
    owns = not session.in_transaction()
    transaction = session.begin() if owns else session.get_transaction()
    assert transaction is not None
    try:
        effect = _claim(session, execution, used)
        yield effect
        if not effect.replayed:
            _record(session, effect, used)
    except BaseException:
        transaction.rollback()
        raise
    if owns:
        transaction.commit()


def run(session: Session, body: Callable[[Session], T], *, codec: Codec | None = None) -> T:
    """``body(session)`` once per key: its writes and return value commit with the effect row,
    and a later attempt returns the recorded value without calling it."""
    with atomic(session, codec=codec) as effect:
        if effect.replayed:
            return effect.value  # type: ignore[no-any-return]
        effect.value = body(session)
    return effect.value  # type: ignore[no-any-return]
