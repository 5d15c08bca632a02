"""The store's own call path (``idemtask.store.wire``) on a real redis-server: one
connection per thread and per process, fresh after the server dropped it, closed when its
thread ends, outside the pool's bound, and the client's configuration (database, retries)
kept."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from idemtask.store import RedisStore, Status

from servers import LOOPBACK, RedisServer

ACQUIRE: dict[str, Any] = {
    "task_name": "shop.charge",
    "fingerprint": "fp",
    "lease_ms": 10_000,
    "max_deliveries": 5,
    "ttl_ms": 60_000,
}


def acquire(store: RedisStore, key: str | None = None) -> Status:
    out = store.acquire(key or uuid.uuid4().hex, task_id="t", attempt_id="a", **ACQUIRE)
    return out.status


def store_clients(admin: redis.Redis) -> int:
    """Connections the server has, other than the admin's own."""
    return len(admin.client_list()) - 1


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_each_thread_keeps_one_connection_and_closes_it_when_it_ends(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    server = fresh_redis()
    admin = server.client()
    store = RedisStore.from_url(server.url)
    for _ in range(3):
        assert acquire(store) is Status.ACQUIRED
    assert store_clients(admin) == 1  # three calls, one connection
    for _ in range(8):  # one thread after another, each making two calls
        worker = threading.Thread(target=lambda: [acquire(store) for _ in range(2)])
        worker.start()
        worker.join()
    # Only the main thread's connection is left, not eight more.
    wait_for(lambda: store_clients(admin) == 1, "ended threads' connections are still open")
    assert acquire(store) is Status.ACQUIRED


def test_held_connections_do_not_count_against_a_bounded_pool(redis_url: str) -> None:
    """Threads that hold a connection each leave the client's pool to its other users
    (renewals, admin reads), however small its bound."""
    store = RedisStore(redis.Redis.from_url(redis_url, max_connections=1))
    workers = [threading.Thread(target=acquire, args=(store,)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert acquire(store) is Status.ACQUIRED
    store.ping()
    assert store.inspect("nothing") is None
    store.client.close()


def _child_acquires(store: RedisStore, answers: Any, done: Any) -> None:
    answers.put(acquire(store).value)
    done.wait(30)  # keeps the child's connection open while the parent counts


def test_a_forked_child_takes_its_own_connection_and_leaves_the_parents(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    server = fresh_redis()
    admin = server.client()
    store = RedisStore.from_url(server.url)
    assert acquire(store) is Status.ACQUIRED  # the parent's connection is open
    context = multiprocessing.get_context("fork")
    answers, done = context.Queue(), context.Event()
    child = context.Process(target=_child_acquires, args=(store, answers, done))
    child.start()
    try:
        assert answers.get(timeout=30) == Status.ACQUIRED.value
        assert store_clients(admin) == 2  # the child did not write on the parent's socket
    finally:
        done.set()
        child.join(30)
    assert child.exitcode == 0
    # Had the child used (or closed) the parent's socket, this would read a stray reply or
    # find the connection shut.
    assert acquire(store) is Status.ACQUIRED
    assert acquire(store) is Status.ACQUIRED
    store.client.close()


def test_a_connection_the_server_dropped_is_replaced_without_a_retry(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    """``from_url`` configures no retries: the call must find out before it sends that the
    server closed the connection, as redis-py's pool does when it hands one out."""
    server = fresh_redis()
    admin = server.client()
    store = RedisStore.from_url(server.url)
    assert acquire(store) is Status.ACQUIRED
    assert admin.client_kill_filter(_type="normal", skipme=True) == 1
    assert acquire(store) is Status.ACQUIRED


def test_the_clients_database_and_retry_policy_are_the_connections(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    server = fresh_redis()
    retry = Retry(NoBackoff(), 3)
    client = redis.Redis(host=LOOPBACK, port=server.port, db=3, retry=retry)
    store = RedisStore(client)
    key = uuid.uuid4().hex
    assert acquire(store, key) is Status.ACQUIRED
    assert server.client().exists(store.record_name(key)) == 0
    assert redis.Redis(host=LOOPBACK, port=server.port, db=3).exists(store.record_name(key)) == 1
    caller = store._caller
    assert caller is not None
    held = caller._local.held.connection
    assert held.retry.get_retries() == 3
    assert type(held._parser) is type(client.connection_pool.make_connection()._parser)
    client.close()


def test_a_pipeline_keeps_redis_pys_path(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert RedisStore(client)._caller is not None
    assert RedisStore(client, lean_calls=False)._caller is None
    assert RedisStore(client.pipeline())._caller is None
    client.close()


GREEN_WORKLOAD = """
import sys
from gevent import monkey

monkey.patch_all()
import gevent
import pytest
import redis

from idemtask.store import RedisStore

url = sys.argv[1]
store = RedisStore.from_url(url)
admin = redis.Redis.from_url(url)


def one(i):
    store.acquire(f"green{i}", task_id=f"t{i}", attempt_id=f"a{i}", task_name="n",
                  fingerprint="", lease_ms=5000, max_deliveries=5, ttl_ms=60000)


before = admin.info("stats")["total_connections_received"]
for batch in range(4):  # four rounds of 50 concurrent tasks, each task its own greenlet
    gevent.joinall([gevent.spawn(one, batch * 50 + i) for i in range(50)])
print(admin.info("stats")["total_connections_received"] - before)
"""


def test_green_threads_share_the_pool_instead_of_a_connection_each(redis_url: str) -> None:
    """Under gevent (Celery's ``-P gevent``) every greenlet is a "thread": a connection per
    thread would be a new connection per task. Those calls take the pool's path, whose
    connections the next tasks reuse: no more than the tasks that ran at once."""
    pytest.importorskip("gevent")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", GREEN_WORKLOAD, redis_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    opened = int(done.stdout.split()[-1])
    assert opened <= 50, f"{opened} connections for 200 tasks, 50 at a time"
