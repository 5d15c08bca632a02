from __future__ import annotations

from collections.abc import Iterator

import pytest

from servers_postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    server = PostgresServer().start()
    try:
        yield server.url
    finally:
        server.stop()
