from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine

from idemtask.sql import metadata

from servers_postgres import PostgresServer
from sql_support import user_md


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    server = PostgresServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        eng = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    else:
        eng = create_engine(request.getfixturevalue("postgres_url"))
    metadata.drop_all(eng)
    user_md.drop_all(eng)
    metadata.create_all(eng)
    user_md.create_all(eng)
    yield eng
    eng.dispose()
