"""pytest plugin, loaded through the ``idemtask`` entry point when idemtask is installed.

Fixtures:

* ``idemtask_redis``: a real ``redis-server`` for the store (session; restart it freely);
* ``idemtask_store``: a ``RedisStore`` on it, emptied for each test;
* ``effect_ledger``: an ``EffectLedger`` on a second Redis, so that
  faults on the store's server never touch the evidence;
* ``faults``: a ``Faults`` writing to that ledger, seeded by
  ``--idemtask-seed``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from idemtask.store.redis import RedisStore
from idemtask.testing.faults import Faults
from idemtask.testing.ledger import EffectLedger
from idemtask.testing.servers import RedisServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--idemtask-seed", type=int, default=0, help="Seed of the fault schedule (default 0)."
    )


@pytest.fixture(scope="session")
def idemtask_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True, appendfsync="everysec") as server:
        yield server


@pytest.fixture(scope="session")
def _idemtask_ledger_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def idemtask_store(idemtask_redis: RedisServer) -> Iterator[RedisStore]:
    idemtask_redis.start()
    store = RedisStore.from_url(idemtask_redis.url)
    store.client.flushall()
    yield store
    store.client.close()


@pytest.fixture
def effect_ledger(_idemtask_ledger_redis: RedisServer) -> Iterator[EffectLedger]:
    client = _idemtask_ledger_redis.client()
    client.flushall()
    ledger = EffectLedger(client)
    yield ledger
    ledger.stop_observing()
    client.close()


@pytest.fixture
def faults(effect_ledger: EffectLedger, request: pytest.FixtureRequest) -> Faults:
    seed = request.config.getoption("--idemtask-seed")
    return Faults(effect_ledger, seed=int(seed))
