"""RedisStore on Redis Cluster and Sentinel: URLs and settings, slots, SCAN on every
primary, round trips per node, scripts on every primary, and WAIT for replicas."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from importlib import resources

import pytest
import redis
from redis.cluster import RedisCluster, key_slot

from idemtask.config import resolve_settings
from idemtask.errors import ConfigurationError
from idemtask.runtime import open_store
from idemtask.store import Lease, RedisStore, Status
from idemtask.store.cluster import cluster_client, sentinel_client
from idemtask.store.redis import script_source

from scale_workload import ACQUIRE, TTL_MS
from servers_cluster import LocalCluster, LocalSentinel


@pytest.fixture(scope="module")
def bare_cluster() -> Iterator[LocalCluster]:
    """3 primaries, no replicas: nothing but the test's own traffic reaches the nodes."""
    with LocalCluster(primaries=3, replicas=0) as cluster:
        yield cluster


@pytest.fixture
def cluster_store(redis_cluster: LocalCluster) -> Iterator[RedisStore]:
    redis_cluster.flushall()
    store = RedisStore.from_url(redis_cluster.url)
    yield store
    store.client.close()


# -- URLs, settings, clients -----------------------------------------------------------------


def test_settings_and_open_store_accept_cluster_and_sentinel_urls(
    redis_cluster: LocalCluster, redis_sentinel: LocalSentinel
) -> None:
    env = {
        "IDEMTASK_REDIS_URL": redis_cluster.url,
        "IDEMTASK_WAIT_REPLICAS": "1",
        "IDEMTASK_WAIT_TIMEOUT_MS": "250",
    }
    settings = resolve_settings(environ=env)
    assert (settings.wait_replicas, settings.wait_timeout_ms) == (1, 250)
    store = open_store(settings)
    assert isinstance(store, RedisStore) and store.is_cluster
    assert isinstance(store.client, RedisCluster)
    assert (store.wait_replicas, store.wait_timeout_ms) == (1, 250)
    store.ping()
    sentinel_settings = resolve_settings({"redis_url": redis_sentinel.url}, environ={})
    sentinel_store = open_store(sentinel_settings)
    assert isinstance(sentinel_store, RedisStore) and not sentinel_store.is_cluster
    assert sentinel_store.wait_replicas == 0
    out = sentinel_store.acquire("k", task_id="t", attempt_id="a", **ACQUIRE)
    assert out.status is Status.ACQUIRED
    primary = redis_sentinel.current_primary().client()
    assert primary.exists(sentinel_store.record_name("k")) == 1
    primary.delete(sentinel_store.record_name("k"))
    primary.close()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"redis_url": "cluster://h:1"}, "redis+cluster://"),
        ({"wait_replicas": "-1"}, "wait_replicas must be an integer >= 0"),
        ({"wait_timeout_ms": "soon"}, "wait_timeout_ms must be an integer >= 1"),
        ({"wait_timeout_ms": 0}, "wait_timeout_ms must be an integer >= 1"),
        ({"wait_replicas": True}, "wait_replicas must be an integer >= 0"),
    ],
)
def test_bad_store_settings_fail_at_start_up(setting: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        resolve_settings(setting, environ={})


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://h:1/3",  # a cluster has database 0 only
        "redis+cluster://h:x/",
        "redis+cluster:///",
        "redis+sentinel://h:26379/",  # no service
        "redis+sentinel://h:26379/svc/zero",
    ],
)
def test_malformed_cluster_and_sentinel_urls_are_configuration_errors(url: str) -> None:
    build = cluster_client if url.startswith("redis+cluster") else sentinel_client
    with pytest.raises(ConfigurationError):
        build(url)


def test_sentinel_url_names_service_database_and_credentials(
    redis_sentinel: LocalSentinel,
) -> None:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in redis_sentinel.sentinels)
    client = sentinel_client(f"redis+sentinel://:pw@{hosts}/mymaster/3")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["db"] == 3 and kwargs["password"] == "pw"
    assert client.connection_pool.service_name == "mymaster"  # type: ignore[attr-defined]
    client.close()


# -- slots -----------------------------------------------------------------------------------


def test_every_script_touches_only_its_one_declared_key() -> None:
    lua = resources.files("idemtask.store") / "lua"
    for script in lua.iterdir():
        if not script.name.endswith(".lua") or script.name.startswith("_"):
            continue
        source = script_source(script.name[: -len(".lua")])
        assert set(re.findall(r"KEYS\[(\w+)\]", source)) == {"1"}, script.name
        # No key names built inside a script (they could hash to another slot).
        assert "redis.call('KEYS'" not in source and "SCAN" not in source, script.name


def test_records_spread_over_every_primary_one_slot_each(cluster_store: RedisStore) -> None:
    keys = [uuid.uuid4().hex for _ in range(120)]
    for key in keys:
        assert cluster_store.acquire(key, task_id="t", attempt_id="a", **ACQUIRE).token == 1
        name = cluster_store.record_name(key)
        assert key_slot(name.encode()) == key_slot(key.encode())  # the hash tag decides
    cluster: RedisCluster = cluster_store.client
    per_node = Counter(cluster.get_node_from_key(cluster_store.record_name(k)).name for k in keys)
    assert len(per_node) == 3 and min(per_node.values()) > 10


def test_scan_visits_every_primary(cluster_store: RedisStore, redis_cluster: LocalCluster) -> None:
    keys = {uuid.uuid4().hex for _ in range(300)}
    for key in keys:
        cluster_store.reserve(
            key, task_id="t", task_name="n", fingerprint="", reservation_ms=60_000, ttl_ms=TTL_MS
        )
    for node in redis_cluster.primary_nodes():
        client = node.client()
        assert client.dbsize() > 50  # every primary holds some of them
        client.close()
    seen = [record.key for record in cluster_store.scan(batch=7)]
    assert sorted(seen) == sorted(keys)  # each once, from all three primaries


def test_renew_many_is_one_round_trip_per_node(bare_cluster: LocalCluster) -> None:
    store = RedisStore.from_url(bare_cluster.url)
    leases = []
    for i in range(30):
        key = f"renew-{i}"
        out = store.acquire(key, task_id="t", attempt_id="a", **ACQUIRE)
        leases.append(Lease(key, "a", out.token, 10_000))
    assert store.renew_many(leases) == [True] * 30  # warm: the script is on every primary
    cluster: RedisCluster = store.client
    leases.append(Lease("renew-0", "someone-else", 1, 10_000))  # not the holder
    expected = Counter(
        int(cluster.get_node_from_key(store.record_name(lease.key)).port) for lease in leases
    )
    assert len(expected) == 3  # the leases live on all three primaries
    nodes = {n.port: n.client(single_connection_client=True) for n in bare_cluster.nodes}
    before = {port: _reads_and_evalsha(client) for port, client in nodes.items()}
    assert store.renew_many(leases) == [True] * 30 + [False]
    for port, client in nodes.items():
        reads, evalsha = _reads_and_evalsha(client)
        # Each _reads_and_evalsha is two requests (two reads): one more read is the batch.
        assert reads - before[port][0] == 2 + 1, port
        assert evalsha - before[port][1] == expected[port], port
        client.close()
    print("\nrenew_many of 31 leases: one read per node; EVALSHA per node:", dict(expected))
    store.client.close()


def _reads_and_evalsha(client: redis.Redis) -> tuple[int, int]:
    """(reads the server processed, EVALSHA calls) from INFO on one connection."""
    reads = int(client.info("stats")["total_reads_processed"])
    calls = int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    return reads, calls


# -- scripts on every primary ----------------------------------------------------------------


def test_scripts_load_on_every_primary_after_a_flush(
    cluster_store: RedisStore, redis_cluster: LocalCluster
) -> None:
    primaries = redis_cluster.primary_nodes()
    for node in primaries:
        client = node.client()
        client.script_flush()
        client.close()
    key = "after-flush"
    out = cluster_store.acquire(key, task_id="t", attempt_id="a", **ACQUIRE)  # NOSCRIPT -> load
    assert out.status is Status.ACQUIRED
    sha = cluster_store._scripts["acquire"].sha
    for node in primaries:
        client = node.client()
        assert client.script_exists(sha) == [True], node.port  # SCRIPT LOAD went to all
        client.close()
    # The pipelined paths reload too: renew_many, and complete + WAIT.
    assert cluster_store.renew_many([Lease(key, "a", out.token, 10_000)]) == [True]
    waiting = RedisStore(cluster_store.client, wait_replicas=1, wait_timeout_ms=1000)
    done = waiting.complete(key, attempt_id="a", token=out.token, result=b"1", result_ttl_ms=9)
    assert done.status is Status.COMPLETED and waiting.wait_shortfalls == 0


# -- WAIT ------------------------------------------------------------------------------------


def test_wait_replicas_means_the_replica_has_the_completion(
    cluster_store: RedisStore, redis_cluster: LocalCluster
) -> None:
    waiting = RedisStore(cluster_store.client, wait_replicas=1, wait_timeout_ms=2000)
    for i in range(40):
        key = f"waited-{i}"
        out = waiting.acquire(key, task_id="t", attempt_id="a", **ACQUIRE)
        done = waiting.complete(
            key, attempt_id="a", token=out.token, result=b"v", result_ttl_ms=TTL_MS
        )
        assert done.status is Status.COMPLETED
        replica = redis_cluster.read_replica(
            redis_cluster.replica_of(redis_cluster.primary_for(waiting.record_name(key)))
        )
        assert replica.hget(waiting.record_name(key), "s") == b"done"  # already there
        replica.close()
    assert waiting.wait_shortfalls == 0


@pytest.mark.parametrize("deployment", ["redis_cluster", "redis_sentinel"])
def test_more_replicas_than_exist_warns_and_still_completes(
    deployment: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    url = request.getfixturevalue(deployment).url
    store = RedisStore.from_url(url, wait_replicas=2, wait_timeout_ms=150)
    key = f"short-{uuid.uuid4().hex}"
    out = store.acquire(key, task_id="t", attempt_id="a", **ACQUIRE)
    with caplog.at_level(logging.WARNING, logger="idemtask.store"):
        began = time.perf_counter()
        done = store.complete(key, attempt_id="a", token=out.token, result=b"v", result_ttl_ms=9)
        elapsed = time.perf_counter() - began
    assert done.status is Status.COMPLETED
    assert store.wait_shortfalls == 1 and "confirmed by 1 of 2 replica" in caplog.text
    assert elapsed >= 0.15
    # A stale completion is not a shortfall (nothing was written).
    stale = store.complete(key, attempt_id="a", token=out.token, result=b"w", result_ttl_ms=9)
    assert stale.status is Status.STALE and store.wait_shortfalls == 1
    store.client.close()


def test_sentinel_store_follows_the_primary_and_wait_reaches_the_replica(
    redis_sentinel: LocalSentinel,
) -> None:
    store = RedisStore.from_url(redis_sentinel.url, wait_replicas=1, wait_timeout_ms=2000)
    replica = redis_sentinel.replicas[0].client()
    for i in range(20):
        key = f"s-{i}-{uuid.uuid4().hex}"
        out = store.acquire(key, task_id="t", attempt_id="a", **ACQUIRE)
        store.complete(key, attempt_id="a", token=out.token, result=b"v", result_ttl_ms=TTL_MS)
        assert replica.hget(store.record_name(key), "s") == b"done"
    assert store.wait_shortfalls == 0
    with pytest.raises(redis.ReadOnlyError):
        replica.set("x", "1")  # the store did not write to the replica: it is read-only
    replica.close()
    store.client.close()


def test_a_zero_wait_timeout_is_refused() -> None:
    """WAIT n 0 blocks until the replicas answer: never what a task completion wants."""
    with pytest.raises(ValueError, match="wait_timeout_ms >= 1"):
        RedisStore(redis.Redis(), wait_replicas=1, wait_timeout_ms=0)


@pytest.mark.parametrize("deployment", ["cluster", "sentinel"])
def test_a_deployment_that_fails_to_start_leaves_no_server_running(deployment: str) -> None:
    """One server of the deployment cannot start: the ones that did are stopped, not left
    running past the test (and past the suite, holding their ports)."""
    made: LocalCluster | LocalSentinel
    if deployment == "cluster":
        made = LocalCluster(primaries=3, replicas=0)
        made.nodes[-1].config["no-such-option"] = "yes"  # redis-server refuses to start
        everyone = made.nodes
    else:
        made = LocalSentinel()
        with made.sentinels[-1].conf.open("a") as conf:
            conf.write("no-such-option yes\n")
        everyone = [*made.data_nodes, *made.sentinels]
    with pytest.raises(RuntimeError, match="exited"), made:
        pass
    assert [server.port for server in everyone if server.running] == []
