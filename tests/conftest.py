"""Fixtures that run the tests against real servers (see ``tests/servers.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from servers import RabbitMQServer, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One ``redis-server`` for the whole session. Do not stop it; use ``fresh_redis``."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis, emptied (FLUSHALL) before the test."""
    redis_server.start()  # no-op unless a test stopped it
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def fresh_redis() -> Iterator[Callable[..., RedisServer]]:
    """Factory of dedicated, started ``RedisServer``s that a test may restart or kill.

    ``fresh_redis(appendonly=True)`` persists every write; all are closed at teardown.
    """
    servers: list[RedisServer] = []

    def make(**options: Any) -> RedisServer:
        server = RedisServer(**options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitMQServer]:
    """One RabbitMQ node for the session, started the first time a test asks for it."""
    with RabbitMQServer() as server:
        yield server
