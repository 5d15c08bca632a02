"""A primary SIGKILLed while workers acquire and complete: what the store answers, what is
lost, and what ``wait_replicas`` changes. Real Redis Cluster and Sentinel deployments.

Each test runs two groups of workers at once against the same deployment and the same
failover: ``plain`` (no WAIT) and ``wait1`` (``wait_replicas=1``). The numbers are printed
(run with ``-s`` to see them) and docs/scaling.md reports them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from idemtask.store import Lease, RedisStore, Status
from idemtask.store.redis import script_source

from scale_workload import (
    ACQUIRE,
    TTL_MS,
    Survival,
    Tally,
    check_survival,
    exercise_every_operation,
    result_for,
    run_groups,
)
from servers import RedisServer
from servers_cluster import LocalCluster, LocalSentinel, wait_until

CLIENT = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0}
WAIT_TIMEOUT_MS = 200
UNUSED_BY_WORKLOAD = ("reserve", "cancel", "renew", "release")


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas=1) as deployment:
        yield deployment


@pytest.fixture
def sentinel() -> Iterator[LocalSentinel]:
    with LocalSentinel(replicas=1) as deployment:
        yield deployment


def _stores(url: str) -> dict[str, RedisStore]:
    return {
        "plain": RedisStore.from_url(url, **CLIENT),
        "wait1": RedisStore.from_url(
            url, wait_replicas=1, wait_timeout_ms=WAIT_TIMEOUT_MS, **CLIENT
        ),
    }


def _scripts_on(client: redis.Redis, names: tuple[str, ...]) -> dict[str, bool]:
    shas = [redis.commands.core.Script(client, script_source(n)).sha for n in names]
    return dict(zip(names, client.script_exists(*shas), strict=True))


def _on(store: RedisStore, key: str, node: RedisServer) -> bool:
    """Whether ``node`` serves ``key``'s slot, in the store's own slot table."""
    served_by = store.client.get_node_from_key(store.record_name(key))
    return int(served_by.port) == node.port


def _role(server: RedisServer) -> bytes:
    client = server.client(socket_timeout=1.0)
    try:
        role: bytes = client.execute_command("ROLE")[0]
        return role
    finally:
        client.close()


def _report(
    where: str, tallies: dict[str, Tally], survival: dict[str, Survival], failover_s: float
) -> None:
    print(f"\n[{where}] failover (kill -> a replica serves the slots): {failover_s:.2f}s")
    for name, tally in tallies.items():
        s = survival[name]
        print(
            f"[{where}] {name}: acquire ok {tally.ok['acquire']}, complete ok "
            f"{tally.ok['complete']}, StoreUnavailable {dict(tally.unavailable)} over "
            f"{tally.outage():.2f}s, slowest call {tally.slowest_s:.2f}s, "
            f"COMPLETED {len(tally.completed)} -> kept {s.kept}, "
            f"lost {s.lost} (absent {s.lost_absent}, back to running {s.lost_running}), "
            f"STALE after a lost acquire {len(tally.stale)}, wrong answers "
            f"{len(tally.unexpected) + len(s.wrong)}"
        )


def _assert_honest(
    tallies: dict[str, Tally], survival: dict[str, Survival], failover_s: float
) -> None:
    for name, tally in tallies.items():
        assert tally.unexpected == [], (name, tally.unexpected[:5])
        assert survival[name].wrong == [], (name, survival[name].wrong[:5])
        assert tally.ok["acquire"] > 50 and len(tally.completed) > 50, name
        assert tally.noticed(failover_s), f"{name}: the kill went unnoticed"


def _duplicates_after_loss(store: RedisStore, survival: Survival) -> int:
    """A later delivery of a key whose completion was lost runs again: count them."""
    again = 0
    for key in survival.lost_keys:
        out = store.acquire(key, task_id="t", attempt_id="redelivery", **ACQUIRE)
        if out.status is Status.BUSY:  # back to running: the lease must end first
            time.sleep(out.lease_left_ms / 1000 + 0.05)
            out = store.acquire(key, task_id="t", attempt_id="redelivery", **ACQUIRE)
        assert out.status is Status.ACQUIRED, out
        again += 1
    return again


def test_cluster_primary_killed_under_load(cluster: LocalCluster) -> None:
    stores = _stores(cluster.url)
    victim = cluster.primary_nodes()[0]
    replica = cluster.replica_of(victim)
    promoted = cluster.read_replica(replica)
    # A client that last saw the old topology, holding leases on the shard that fails.
    stale_view = RedisStore.from_url(
        cluster.url, wait_replicas=1, wait_timeout_ms=WAIT_TIMEOUT_MS, **CLIENT
    )
    held = [k for k in (f"held-{i}" for i in range(200)) if _on(stale_view, k, victim)]
    leases = []
    for key in held[:3]:
        out = stale_view.acquire(
            key, task_id="t", attempt_id="h", **{**ACQUIRE, "lease_ms": 60_000}
        )
        leases.append(Lease(key, "h", out.token, 60_000))
    tallies, failover_s = run_groups(stores, 2, lambda: cluster.kill_and_fail_over(victim))
    assert promoted.execute_command("ROLE")[0] == b"master"
    # Scripts are not replicated: the promoted node had none of those the workload did
    # not call, and loads each one on its NOSCRIPT.
    missing = _scripts_on(promoted, UNUSED_BY_WORKLOAD)
    assert not any(missing.values()), missing
    # Its first calls after the failover find the new primary (slot table read again).
    assert stale_view.renew_many(leases) == [True] * 3
    done = stale_view.complete(
        leases[0].key, attempt_id="h", token=leases[0].token, result=b"1", result_ttl_ms=TTL_MS
    )
    assert done.status is Status.COMPLETED
    probe = RedisStore.from_url(cluster.url, **CLIENT)
    key = next(f"probe-{i}" for i in range(10_000) if _on(probe, f"probe-{i}", replica))
    exercise_every_operation(probe, key)
    exercise_every_operation(stores["wait1"], key)
    assert all(_scripts_on(promoted, UNUSED_BY_WORKLOAD).values())
    survival = {name: check_survival(probe, tallies[name].completed) for name in tallies}

    _report("cluster", tallies, survival, failover_s)
    _assert_honest(tallies, survival, failover_s)
    # A completion that one replica confirmed survives the failover to that replica.
    assert survival["wait1"].lost <= stores["wait1"].wait_shortfalls
    dup = {name: _duplicates_after_loss(probe, survival[name]) for name in survival}
    print(f"[cluster] later acquires that ran again after a lost completion: {dup}")
    print(
        f"[cluster] wait1 completions fewer replicas confirmed: {stores['wait1'].wait_shortfalls}"
    )
    promoted.close()


def test_sentinel_primary_killed_under_load(sentinel: LocalSentinel) -> None:
    stores = _stores(sentinel.url)
    victim = sentinel.current_primary()
    replica = sentinel.replicas[0]

    def fault() -> float:
        began = time.monotonic()
        victim.kill()
        wait_until(lambda: sentinel.current_primary() is replica, 30.0, "sentinel failover")
        wait_until(
            lambda: replica.client().execute_command("ROLE")[0] == b"master", 30.0, "promotion"
        )
        return time.monotonic() - began

    tallies, failover_s = run_groups(stores, 2, fault)
    promoted = replica.client()
    missing = _scripts_on(promoted, UNUSED_BY_WORKLOAD)
    assert not any(missing.values()), missing
    probe = RedisStore.from_url(sentinel.url, **CLIENT)
    exercise_every_operation(probe, "probe")
    exercise_every_operation(stores["wait1"], "probe")
    assert all(_scripts_on(promoted, UNUSED_BY_WORKLOAD).values())
    survival = {name: check_survival(probe, tallies[name].completed) for name in tallies}
    _report("sentinel", tallies, survival, failover_s)
    _assert_honest(tallies, survival, failover_s)
    assert survival["wait1"].lost <= stores["wait1"].wait_shortfalls
    dup = {name: _duplicates_after_loss(probe, survival[name]) for name in survival}
    print(f"[sentinel] later acquires that ran again after a lost completion: {dup}")
    # No replica is left: every completion now waits the whole timeout and warns.
    shortfalls = stores["wait1"].wait_shortfalls
    began = time.perf_counter()
    exercise_every_operation(stores["wait1"], "alone")
    assert stores["wait1"].wait_shortfalls == shortfalls + 1
    assert time.perf_counter() - began >= WAIT_TIMEOUT_MS / 1000
    print(f"[sentinel] wait1 completions fewer replicas confirmed: {shortfalls}")
    promoted.close()


def test_a_completion_the_replica_never_got_is_lost_and_runs_again(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The replica's link is cut (it cannot authenticate to its primary any more), the
    primary records a completion and dies. The promoted replica still has the record as
    ``running``: once the lease ends, a redelivery takes it over and runs the task again.
    With ``wait_replicas=1`` the same completion is COMPLETED too, but the store warns."""
    plain = RedisStore.from_url(cluster.url, **CLIENT)
    waiting = RedisStore.from_url(
        cluster.url, wait_replicas=1, wait_timeout_ms=WAIT_TIMEOUT_MS, **CLIENT
    )
    keys = ["lost-plain", "lost-wait"]
    victim = cluster.primary_for(plain.record_name(keys[0]))
    key_wait = next(f"lost-wait-{i}" for i in range(10_000) if _on(plain, f"lost-wait-{i}", victim))
    replica = cluster.replica_of(victim)
    replica_client = cluster.read_replica(replica)
    tokens = {}
    for key in (keys[0], key_wait):
        tokens[key] = plain.acquire(key, task_id="t", attempt_id="a", **ACQUIRE).token
    wait_until(
        lambda: replica_client.hget(plain.record_name(key_wait), "s") == b"running",
        10.0,
        "the acquire on the replica",
    )
    replica_client.config_set("masterauth", "not-the-password")
    replica_client.execute_command("CLIENT", "KILL", "TYPE", "master")
    wait_until(
        lambda: replica_client.info("replication")["master_link_status"] == "down",
        10.0,
        "the replication link to drop",
    )
    done = plain.complete(
        keys[0], attempt_id="a", token=tokens[keys[0]], result=result_for(keys[0]),
        result_ttl_ms=TTL_MS,
    )  # fmt: skip
    assert done.status is Status.COMPLETED
    with caplog.at_level(logging.WARNING, logger="idemtask.store"):
        began = time.perf_counter()
        waited = waiting.complete(
            key_wait, attempt_id="a", token=tokens[key_wait], result=result_for(key_wait),
            result_ttl_ms=TTL_MS,
        )  # fmt: skip
        wait_ms = (time.perf_counter() - began) * 1000
    assert waited.status is Status.COMPLETED
    assert waiting.wait_shortfalls == 1
    assert "confirmed by 0 of 1 replica" in caplog.text
    assert wait_ms >= WAIT_TIMEOUT_MS
    assert replica_client.hget(plain.record_name(keys[0]), "s") == b"running"
    failover_s = cluster.kill_and_fail_over(victim)
    for key in (keys[0], key_wait):
        record = plain.inspect(key)
        assert record is not None and record.state.value == "running"  # the done is gone
        again = plain.acquire(key, task_id="t", attempt_id="b", **ACQUIRE)
        if again.status is Status.BUSY:  # the lost attempt's lease has not ended yet
            time.sleep(again.lease_left_ms / 1000 + 0.05)
            again = plain.acquire(key, task_id="t", attempt_id="b", **ACQUIRE)
        assert again.status is Status.ACQUIRED and again.takeover and again.token == 2
    print(
        f"\n[lost completion] failover {failover_s:.2f}s; both completions lost; WAIT "
        f"reported 0/1 replicas after {wait_ms:.0f} ms; both keys taken over (token 2)"
    )
    replica_client.close()


def test_a_completion_wait_held_back_until_the_replica_had_it_survives(
    cluster: LocalCluster,
) -> None:
    """The same cut link, but the link comes back while ``complete`` waits: WAIT returns
    once the replica has the completion, and a failover right after keeps it. A completion
    without WAIT returns before the replica has it (the replica still says ``running``)."""
    plain = RedisStore.from_url(cluster.url, **CLIENT)
    waiting = RedisStore.from_url(cluster.url, wait_replicas=1, wait_timeout_ms=10_000, **CLIENT)
    victim = cluster.primary_nodes()[0]
    key = next(f"held-{i}" for i in range(10_000) if _on(plain, f"held-{i}", victim))
    other = next(f"fast-{i}" for i in range(10_000) if _on(plain, f"fast-{i}", victim))
    replica_client = cluster.read_replica(cluster.replica_of(victim))
    tokens = {
        k: plain.acquire(k, task_id="t", attempt_id="a", **ACQUIRE).token for k in (key, other)
    }
    wait_until(
        lambda: replica_client.hget(plain.record_name(other), "s") == b"running", 10.0, "sync"
    )
    replica_client.config_set("masterauth", "not-the-password")
    replica_client.execute_command("CLIENT", "KILL", "TYPE", "master")
    wait_until(
        lambda: replica_client.info("replication")["master_link_status"] == "down", 10.0, "cut"
    )
    fast = plain.complete(
        other, attempt_id="a", token=tokens[other], result=b"f", result_ttl_ms=TTL_MS
    )
    assert fast.status is Status.COMPLETED
    assert replica_client.hget(plain.record_name(other), "s") == b"running"  # not there yet
    restore = threading.Timer(0.5, lambda: replica_client.config_set("masterauth", ""))
    restore.start()
    began = time.perf_counter()
    done = waiting.complete(
        key, attempt_id="a", token=tokens[key], result=result_for(key), result_ttl_ms=TTL_MS
    )
    held_ms = (time.perf_counter() - began) * 1000
    restore.join()
    assert done.status is Status.COMPLETED and waiting.wait_shortfalls == 0
    assert held_ms >= 500  # it waited for the link to come back
    failover_s = cluster.kill_and_fail_over(victim)
    replay = plain.acquire(key, task_id="t", attempt_id="b", **ACQUIRE)
    assert replay.status is Status.DONE and replay.result is not None
    assert replay.result.data == result_for(key)
    print(
        f"\n[held completion] WAIT held complete {held_ms:.0f} ms until the replica had it; "
        f"failover {failover_s:.2f}s; the completion survived"
    )
    replica_client.close()
