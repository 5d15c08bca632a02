"""Session-wide Redis Cluster, Sentinel and Valkey deployments for the scale tests.

They are started the first time a test asks for them and shared by the tests that only read
and write records; failover tests build their own (they kill nodes).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from servers_cluster import LocalCluster, LocalSentinel, valkey_binary


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """3 primaries + 3 replicas of redis-server, cluster mode."""
    with LocalCluster(primaries=3, replicas=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[LocalSentinel]:
    """A primary, one replica and three sentinels (quorum 2), redis-server."""
    with LocalSentinel(replicas=1) as deployment:
        yield deployment


@pytest.fixture(scope="session")
def valkey_cluster() -> Iterator[LocalCluster]:
    """3 primaries + 3 replicas of valkey-server, cluster mode."""
    with LocalCluster(primaries=3, replicas=1, binary=valkey_binary()) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def valkey_sentinel() -> Iterator[LocalSentinel]:
    """A valkey primary, one replica and three valkey sentinels."""
    with LocalSentinel(replicas=1, binary=valkey_binary()) as deployment:
        yield deployment
