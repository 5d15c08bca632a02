"""pytest plugin, loaded through the ``idemtask`` entry point when idemtask is installed.

Fixtures:

* ``idemtask_redis``: a real ``redis-server`` for the store (session; restart it freely);
* ``idemtask_store``: a ``RedisStore`` on it, emptied for each test;
* ``idemtask_ledger``: an ``EffectLedger`` on a second Redis, so that
  faults on the store's server never touch the evidence;
* ``idemtask_faults``: a ``Faults`` writing to that ledger, seeded by
  ``--idemtask-seed``.

Every name starts with ``idemtask_``: the plugin loads into every pytest run of a project
that has idemtask installed, and must not shadow that project's own fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from idemtask.store.redis import RedisStore
from idemtask.testing.faults import Faults
from idemtask.testing.launcher import RedisServer
from idemtask.testing.ledger import EffectLedger


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--idemtask-seed", type=int, default=0, help="Seed of the fault schedule (default 0)."
    )


@pytest.fixture(scope="session")
def idemtask_redis() -> Iterator[RedisServer]:
    """A real ``redis-server`` for the store (append-only file on); restart or kill it."""
    with RedisServer(appendonly=True, appendfsync="everysec") as server:
        yield server


@pytest.fixture(scope="session")
def _idemtask_ledger_redis() -> Iterator[RedisServer]:
    """The ledger's own ``redis-server``, out of reach of the faults on the store's."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def idemtask_store(idemtask_redis: RedisServer) -> Iterator[RedisStore]:
    """A ``RedisStore`` on ``idemtask_redis``, emptied (FLUSHALL) for each test."""
    idemtask_redis.start()
    store = RedisStore.from_url(idemtask_redis.url)
    store.client.flushall()
    yield store
    store.client.close()


@pytest.fixture
def idemtask_ledger(_idemtask_ledger_redis: RedisServer) -> Iterator[EffectLedger]:
    """An ``EffectLedger`` on its own Redis, emptied for each test."""
    client = _idemtask_ledger_redis.client()
    client.flushall()
    ledger = EffectLedger(client)
    yield ledger
    ledger.stop_observing()
    client.close()


@pytest.fixture
def idemtask_faults(idemtask_ledger: EffectLedger, request: pytest.FixtureRequest) -> Faults:
    """A ``Faults`` that records to ``idemtask_ledger``, seeded by ``--idemtask-seed``."""
    seed = request.config.getoption("--idemtask-seed")
    return Faults(idemtask_ledger, seed=int(seed))
