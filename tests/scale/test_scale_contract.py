"""The store contract suite (tests/core/test_store_contract.py), unchanged, on Redis Cluster,
Sentinel and Valkey (cluster and sentinel).

The contract's test functions are imported into this module, so pytest runs them here with
this module's ``store`` fixture instead of the memory/single-server one.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from idemtask.store import RedisStore, Store

from servers_cluster import LocalCluster, LocalSentinel


def _contract_module() -> ModuleType:
    core = str(Path(__file__).resolve().parents[1] / "core")
    if core not in sys.path:
        sys.path.insert(0, core)
    return importlib.import_module("test_store_contract")


_contract = _contract_module()
CONTRACT_TESTS = sorted(name for name in vars(_contract) if name.startswith("test_"))
globals().update({name: getattr(_contract, name) for name in CONTRACT_TESTS})

DEPLOYMENTS = ["redis-cluster", "redis-sentinel", "valkey-cluster", "valkey-sentinel"]


@pytest.fixture(params=DEPLOYMENTS)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    kind, topology = request.param.split("-")
    deployment = request.getfixturevalue(f"{kind}_{topology}")
    if isinstance(deployment, LocalCluster):
        deployment.flushall()
        redis_store = RedisStore.from_url(deployment.url)
        assert redis_store.is_cluster
    else:
        assert isinstance(deployment, LocalSentinel)
        client = deployment.current_primary().client()
        client.flushall()
        client.close()
        redis_store = RedisStore.from_url(deployment.url)
        assert not redis_store.is_cluster
    yield redis_store
    redis_store.client.close()


def test_the_whole_contract_is_imported() -> None:
    """A renamed or added contract test must run here too."""
    assert len(CONTRACT_TESTS) >= 20
    assert all(callable(globals()[name]) for name in CONTRACT_TESTS)
