"""The effect table, as SQLAlchemy metadata (for Alembic autogenerate or ``create_all``)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, LargeBinary, MetaData, Table, Text

metadata = MetaData()

effects_table = Table(
    "idemtask_effects",
    metadata,
    Column("key", Text, primary_key=True),
    Column("token", BigInteger, nullable=False),
    Column("task_name", Text, nullable=False),
    Column("value", LargeBinary, nullable=True),
    Column("created_at", DateTime, nullable=False),
)
