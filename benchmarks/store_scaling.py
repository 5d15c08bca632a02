"""Store-only throughput on Redis Cluster with 1, 2 and 3 primaries, and the cost of WAIT.

Throughput: ``--procs`` client processes each run reserve -> acquire -> complete on fresh
keys (one "task" = three transitions, three round trips) for ``--seconds``; the three
clusters (no replicas) and one plain server (no cluster, for reference) run side by side
and are measured in rotating order, ``--rounds`` times; the report gives each one's median
tasks/s and its ratio to the 1-primary cluster (ratio of the medians, and the median of the
per-round ratios).

WAIT cost: one client completes ``--completes`` records on a primary with one replica,
``wait_replicas=0`` and ``=1`` alternated in rounds; the report gives median and p99
latency of ``complete`` for each.

Run from the repository root: ``python benchmarks/store_scaling.py`` (``--json`` for the raw
numbers). It starts its own redis-server processes on loopback ports.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from idemtask.store import Acquired, Completed, New, RedisStore
from idemtask.testing.launcher import RedisServer

from servers_cluster import LocalCluster

TTL_MS = 600_000
RESERVE: dict[str, Any] = {"task_name": "bench", "fingerprint": "", "ttl_ms": TTL_MS}
ACQUIRE: dict[str, Any] = {
    "task_name": "bench",
    "fingerprint": "",
    "lease_ms": 30_000,
    "max_deliveries": 5,
    "ttl_ms": TTL_MS,
}


def one_task(store: RedisStore, key: str) -> None:
    assert isinstance(store.reserve(key, task_id="t", reservation_ms=30_000, **RESERVE), New)
    out = store.acquire(key, task_id="t", attempt_id="a", **ACQUIRE)
    assert isinstance(out, Acquired), out
    done = store.complete(key, attempt_id="a", token=out.token, result=b"1", result_ttl_ms=TTL_MS)
    assert isinstance(done, Completed), done


def _client(jobs: Any, start: Any, results: Any) -> None:
    """A client process: measures one (url, seconds) job after another until None."""
    stores: dict[str, RedisStore] = {}
    prefix = uuid.uuid4().hex[:8]
    done = 0
    while (job := jobs.get()) is not None:
        url, seconds = job
        if url not in stores:
            stores[url] = RedisStore.from_url(url)
            one_task(stores[url], f"{prefix}-warm-{len(stores)}")  # connect, slots, scripts
        store = stores[url]
        start.wait()
        began = done
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            one_task(store, f"{prefix}-{done}")
            done += 1
        results.put((done - began) / seconds)


class Clients:
    """``procs`` client processes, started once and reused by every measurement."""

    def __init__(self, procs: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.start = ctx.Barrier(procs + 1)
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(procs)]
        self.workers = [
            ctx.Process(target=_client, args=(jobs, self.start, self.results)) for jobs in self.jobs
        ]
        for worker in self.workers:
            worker.start()

    def throughput(self, url: str, seconds: float) -> float:
        """Tasks per second, all client processes together."""
        for jobs in self.jobs:
            jobs.put((url, seconds))
        self.start.wait(timeout=120)
        return float(sum(self.results.get(timeout=seconds + 60) for _ in self.workers))

    def close(self) -> None:
        for jobs in self.jobs:
            jobs.put(None)
        for worker in self.workers:
            worker.join(timeout=30)
            if worker.exitcode != 0:
                raise RuntimeError(f"a client process failed ({worker.exitcode})")


def server_cpu_seconds(nodes: list[RedisServer]) -> float:
    """CPU seconds (user + sys) the ``nodes`` have used so far."""
    total = 0.0
    for node in nodes:
        client = node.client()
        try:
            info = client.info("cpu")
        finally:
            client.close()
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


BASE = "1 primary"
TARGETS = ("no cluster", BASE, "2 primaries", "3 primaries")


def scaling(rounds: int, procs: int, seconds: float) -> dict[str, Any]:
    """Each target measured once per round, in rotating order; medians and ratios."""
    standalone = RedisServer()
    clusters = {n: LocalCluster(primaries=n, replicas=0) for n in (1, 2, 3)}
    clients: Clients | None = None
    try:
        standalone.start()
        for cluster in clusters.values():
            cluster.start()
        targets: dict[str, tuple[str, list[RedisServer]]] = {
            "no cluster": (standalone.url, [standalone]),
            **{TARGETS[n]: (clusters[n].url, clusters[n].nodes) for n in (1, 2, 3)},
        }
        clients = Clients(procs)
        samples: dict[str, list[float]] = {name: [] for name in TARGETS}
        cpu: dict[str, list[float]] = {name: [] for name in TARGETS}
        for r in range(rounds):
            order = TARGETS[r % 4 :] + TARGETS[: r % 4]  # rotate who goes first
            for name in order:
                url, nodes = targets[name]
                used = server_cpu_seconds(nodes)
                samples[name].append(clients.throughput(url, seconds))
                # Roughly the measured window (the clients wait at a barrier before it).
                cpu[name].append((server_cpu_seconds(nodes) - used) / seconds)
                print(
                    f"round {r + 1}: {name:<11} {samples[name][-1]:8.0f} tasks/s, "
                    f"servers busy {cpu[name][-1]:.2f} cores",
                    flush=True,
                )
        medians = {name: statistics.median(v) for name, v in samples.items()}
        # Each round's ratio to that round's 1-primary figure: drift between rounds cancels.
        per_round = {
            name: statistics.median(a / b for a, b in zip(v, samples[BASE], strict=True))
            for name, v in samples.items()
        }
        return {
            "samples_tasks_per_s": samples,
            "median_of_round_ratios": per_round,
            "median_server_cores": {name: statistics.median(v) for name, v in cpu.items()},
            "median_tasks_per_s": medians,
            "ratio_to_1_primary": {name: medians[name] / medians[BASE] for name in medians},
        }
    finally:
        if clients is not None:
            clients.close()
        for cluster in clusters.values():
            cluster.close()
        standalone.close()


def wait_cost(rounds: int, completes: int) -> dict[str, Any]:
    """complete latency with and without WAIT 1, alternated, from one client."""
    primary = RedisServer(config={"repl-diskless-sync-delay": "0"}).start()
    replica = RedisServer(config={"replicaof": f"127.0.0.1 {primary.port}"}).start()
    try:
        deadline = time.monotonic() + 30
        while primary.client().info("replication").get("slave0", {}).get("state") != "online":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not come online")
            time.sleep(0.05)
        stores = {
            "wait_replicas=0": RedisStore.from_url(primary.url),
            "wait_replicas=1": RedisStore.from_url(primary.url, wait_replicas=1,
                                                   wait_timeout_ms=1000),
        }  # fmt: skip
        for store in stores.values():  # connections, scripts, the replica's first ACKs
            for i in range(50):
                out = store.acquire(f"warm-{i}", task_id="t", attempt_id="a", **ACQUIRE)
                assert isinstance(out, Acquired), out
                store.complete(f"warm-{i}", attempt_id="a", token=out.token, result=b"1",
                               result_ttl_ms=TTL_MS)  # fmt: skip
            store.client.delete(*[f"idemtask:{{warm-{i}}}" for i in range(50)])
        latencies: dict[str, list[float]] = {name: [] for name in stores}
        for r in range(rounds):
            names = list(stores) if r % 2 == 0 else list(reversed(stores))
            for name in names:
                store = stores[name]
                prefix = uuid.uuid4().hex[:8]
                for i in range(completes):
                    key = f"{prefix}-{i}"
                    out = store.acquire(key, task_id="t", attempt_id="a", **ACQUIRE)
                    assert isinstance(out, Acquired), out
                    began = time.perf_counter()
                    done = store.complete(
                        key, attempt_id="a", token=out.token, result=b"1", result_ttl_ms=TTL_MS
                    )
                    latencies[name].append((time.perf_counter() - began) * 1e6)
                    assert isinstance(done, Completed), done
        shortfalls = stores["wait_replicas=1"].wait_shortfalls
        summary = {
            name: {
                "median_us": statistics.median(values),
                "p99_us": statistics.quantiles(values, n=100)[98],
                "samples": len(values),
            }
            for name, values in latencies.items()
        }
        return {"complete_latency": summary, "wait_shortfalls": shortfalls}
    finally:
        replica.close()
        primary.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--completes", type=int, default=2000, help="per WAIT round")
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}, client processes: {args.procs}, rounds: {args.rounds}")
    scale = scaling(args.rounds, args.procs, args.seconds)
    wait = wait_cost(args.rounds, args.completes)
    print("\n(1 task = reserve + acquire + complete; servers' CPU in cores, all nodes)")
    print(
        "store         median tasks/s  ratio of medians  median round ratio  "
        "min..max tasks/s  server cores"
    )
    for name, median in scale["median_tasks_per_s"].items():
        values = scale["samples_tasks_per_s"][name]
        print(
            f"{name:<12}  {median:14.0f}  {scale['ratio_to_1_primary'][name]:16.2f}  "
            f"{scale['median_of_round_ratios'][name]:18.2f}  "
            f"{min(values):7.0f}..{max(values):<7.0f}  "
            f"{scale['median_server_cores'][name]:12.2f}"
        )
    print("\ncomplete latency, one client, primary + 1 replica on loopback")
    for name, row in wait["complete_latency"].items():
        print(f"{name}: median {row['median_us']:.0f} us, p99 {row['p99_us']:.0f} us "
              f"({row['samples']} completes)")  # fmt: skip
    print(f"wait_replicas=1 completions short of a replica: {wait['wait_shortfalls']}")
    if args.json:
        print(json.dumps({"scaling": scale, "wait": wait}, indent=2))


if __name__ == "__main__":
    main()
