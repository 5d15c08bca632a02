"""The user's table and helpers shared by the idemtask.sql tests and their worker script."""

from __future__ import annotations

from sqlalchemy import Column, Engine, Integer, MetaData, Table, Text, func, select

from idemtask.context import Execution

user_md = MetaData()
payments = Table("payments", user_md, Column("id", Integer, primary_key=True), Column("ref", Text))


def as_attempt(token: int, key: str = "k1") -> Execution:
    return Execution(key, "shop.pay", "t", f"a{token}", token, takeover=token > 1)


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(payments)).scalar_one())
