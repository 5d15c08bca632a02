"""Every way a real store can fail a call comes out of RedisStore as a ``StoreUnavailable``.

Each fault is produced on a real ``redis-server`` (or a loopback server that is not Redis),
then every store operation is called: each either answers (reads a refusing server still
serves) or raises a ``StoreUnavailable`` subclass naming what the store answered, never a
redis-py type, and no message or traceback shows the password.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from idemtask.errors import StoreRefused, StoreUnavailable, StoreUnreachable
from idemtask.store import Lease, RedisStore, Status

from servers import LOOPBACK, RedisServer

USER = "idt"
PASSWORD = "s3cret-PW-7f2a"


@dataclass
class Prepared:
    """Records written before the fault, so that writing operations have work to do."""

    store: RedisStore
    renewing: Lease
    completing: Lease
    releasing: Lease
    reserved: str = "reserved"
    writes: set[str] = field(default_factory=set)


def _url(port: int) -> str:
    return f"redis://{USER}:{PASSWORD}@{LOOPBACK}:{port}/0"


def _with_user(server: RedisServer) -> None:
    client = server.client()
    try:
        client.acl_setuser(
            USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], commands=["+@all"]
        )
    finally:
        client.close()


def _lease(store: RedisStore, key: str) -> Lease:
    out = store.acquire(
        key,
        task_id="t",
        attempt_id=f"a-{key}",
        task_name="n",
        fingerprint="",
        lease_ms=60_000,
        max_deliveries=5,
        ttl_ms=600_000,
    )
    assert out.status is Status.ACQUIRED
    return Lease(key, f"a-{key}", out.token, 60_000)


def _prepare(port: int) -> Prepared:
    store = RedisStore.from_url(_url(port), socket_timeout=2.0)
    outcome = store.reserve(
        "reserved",
        task_id="t",
        task_name="n",
        fingerprint="",
        reservation_ms=60_000,
        ttl_ms=600_000,
    )
    assert outcome.status is Status.NEW
    return Prepared(
        store, _lease(store, "renewing"), _lease(store, "completing"), _lease(store, "releasing")
    )


def _operations(p: Prepared) -> dict[str, Callable[[], Any]]:
    s = p.store
    return {
        "reserve": lambda: s.reserve(
            "fresh", task_id="t2", task_name="n", fingerprint="", reservation_ms=1000, ttl_ms=1000
        ),
        "cancel": lambda: s.cancel(p.reserved, task_id="t"),
        "acquire": lambda: s.acquire(
            "fresh2",
            task_id="t2",
            attempt_id="b",
            task_name="n",
            fingerprint="",
            lease_ms=1000,
            max_deliveries=5,
            ttl_ms=1000,
        ),
        "renew_many": lambda: s.renew_many([p.renewing]),
        "complete": lambda: s.complete(
            p.completing.key,
            attempt_id=p.completing.attempt_id,
            token=p.completing.token,
            result=b"r",
            result_ttl_ms=1000,
        ),
        "release": lambda: s.release(
            p.releasing.key,
            attempt_id=p.releasing.attempt_id,
            token=p.releasing.token,
            error="e",
            terminal=False,
            ttl_ms=1000,
        ),
        "forget": lambda: s.forget("renewing"),
        "inspect": lambda: s.inspect("renewing"),
        "scan": lambda: list(s.scan()),
        "ping": s.ping,
    }


WRITES = {"reserve", "cancel", "acquire", "renew_many", "complete", "release", "forget"}


def _failures(p: Prepared) -> dict[str, StoreUnavailable]:
    """Call every operation; the ones that failed, by name. Anything but a
    StoreUnavailable escapes and fails the test."""
    failed: dict[str, StoreUnavailable] = {}
    for name, op in _operations(p).items():
        try:
            op()
        except StoreUnavailable as exc:
            failed[name] = exc
    return failed


def _assert_no_secret(failed: dict[str, StoreUnavailable]) -> None:
    for name, exc in failed.items():
        shown = "".join(traceback.format_exception(exc)) + repr(exc)
        assert PASSWORD not in shown, f"{name}: {shown}"


def _assert_refused(failed: dict[str, StoreUnavailable], reason: str, expect: set[str]) -> None:
    assert set(failed) >= expect, f"these did not fail: {expect - set(failed)}"
    for name, exc in failed.items():
        assert isinstance(exc, StoreRefused), f"{name}: {exc!r}"
        assert exc.reason == reason, f"{name}: {exc}"
        assert reason in str(exc)
    _assert_no_secret(failed)


@pytest.fixture
def server(fresh_redis: Callable[..., RedisServer]) -> RedisServer:
    started = fresh_redis(config={"enable-protected-configs": "yes"})
    _with_user(started)
    return started


def test_out_of_memory_under_noeviction(server: RedisServer) -> None:
    prepared = _prepare(server.port)
    admin = server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    _assert_refused(_failures(prepared), "OOM", WRITES - {"forget"})  # DEL frees memory
    admin.config_set("maxmemory", 0)
    assert prepared.store.renew_many([prepared.completing]) == [True]  # recovers by itself


def test_failed_rdb_save_stops_writes(server: RedisServer) -> None:
    prepared = _prepare(server.port)
    admin = server.client()
    gone = server.dir / "gone"
    gone.mkdir()
    admin.config_set("dir", str(gone))
    shutil.rmtree(gone)
    admin.config_set("save", "3600 1")
    admin.bgsave()
    deadline = time.monotonic() + 10
    while admin.info("persistence")["rdb_last_bgsave_status"] != "err":
        assert time.monotonic() < deadline, "BGSAVE did not fail"
        time.sleep(0.05)
    try:
        _assert_refused(_failures(prepared), "MISCONF", WRITES)
    finally:  # a shutdown would try to save again, and refuse to stop
        admin.config_set("save", "")
        admin.config_set("dir", str(server.dir))


def test_replica_refuses_writes(
    server: RedisServer, fresh_redis: Callable[..., RedisServer]
) -> None:
    prepared = _prepare(server.port)
    other = fresh_redis()
    # Copy the records to the other server, promote it, then make ours its replica: ours
    # keeps the same records and refuses every write to them.
    _replicate(other, server)
    other.client().replicaof("NO", "ONE")
    _replicate(server, other)
    failed = _failures(prepared)
    _assert_refused(failed, "READONLY", WRITES)
    assert prepared.store.inspect("renewing") is not None  # reads still served


def _replicate(replica: RedisServer, primary: RedisServer) -> None:
    client = replica.client()
    client.replicaof(LOOPBACK, primary.port)
    deadline = time.monotonic() + 15
    while client.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "replication did not start"
        time.sleep(0.05)
    client.close()


def test_acl_without_evalsha(server: RedisServer) -> None:
    prepared = _prepare(server.port)
    admin = server.client()
    # enabled=True: ACL SETUSER without "on" turns the user off, and a new connection
    # would then fail to authenticate instead of being refused the command.
    admin.acl_setuser(USER, enabled=True, commands=["-evalsha", "-eval"])
    failed = _failures(prepared)
    _assert_refused(failed, "NOPERM", WRITES - {"forget"})  # DEL is still allowed


def test_busy_script_on_the_server(server: RedisServer) -> None:
    prepared = _prepare(server.port)
    admin = server.client()
    admin.config_set("busy-reply-threshold", 20)
    spinner = threading.Thread(target=_spin, args=(server,), daemon=True)
    spinner.start()
    probe = server.client()
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
        except redis.exceptions.ResponseError as exc:
            assert str(exc).startswith("BUSY")
            break
        assert time.monotonic() < deadline, "the script did not make the server busy"
        time.sleep(0.02)
    try:
        _assert_refused(_failures(prepared), "BUSY", set(_operations(prepared)))
    finally:
        probe.script_kill()
        spinner.join(10)


def _spin(server: RedisServer) -> None:
    client = server.client(socket_timeout=30)
    try:
        client.eval("while true do end", 0)
    except redis.exceptions.ResponseError:  # killed by SCRIPT KILL
        pass
    finally:
        client.close()


@contextmanager
def _loopback_server(answer: Callable[[bytes], bytes]) -> Iterator[int]:
    """A TCP server on loopback that answers every read with ``answer(request)``."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen()
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(answer(data))

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _unprepared(port: int) -> Prepared:
    store = RedisStore.from_url(_url(port), socket_timeout=2.0)
    nothing = Lease("k", "a", 1, 1000)
    return Prepared(store, nothing, nothing, nothing)


def test_a_server_that_is_not_redis() -> None:
    with _loopback_server(lambda _: b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        prepared = _unprepared(port)
        failed = _failures(prepared)
    assert set(failed) == set(_operations(prepared))
    for name, exc in failed.items():
        assert isinstance(exc, StoreUnreachable), f"{name}: {exc!r}"
        # redis-py's own parser quotes the line; hiredis names the first byte.
        assert "Redis protocol" in str(exc)
        assert "HTTP/1.1 400" in str(exc) or 'got "H"' in str(exc), str(exc)
    _assert_no_secret(failed)


def test_a_proxy_that_echoes_the_command_in_its_error_does_not_leak_the_password() -> None:
    def echo(request: bytes) -> bytes:
        return b"-ERR cannot handle " + request.replace(b"\r\n", b" ") + b"\r\n"

    with _loopback_server(echo) as port:
        prepared = _unprepared(port)
        failed = _failures(prepared)
    assert set(failed) == set(_operations(prepared))
    for name, exc in failed.items():
        assert isinstance(exc, StoreRefused) and exc.reason == "ERR", f"{name}: {exc!r}"
        assert "cannot handle" in str(exc) and "***" in str(exc)
    _assert_no_secret(failed)


def test_refused_connections_are_unreachable(server: RedisServer) -> None:
    prepared = _prepare(server.port)
    server.stop()
    failed = _failures(prepared)
    assert set(failed) == set(_operations(prepared))
    for name, exc in failed.items():
        assert isinstance(exc, StoreUnreachable), f"{name}: {exc!r}"
    _assert_no_secret(failed)


def test_a_store_failure_survives_pickling_with_its_reason() -> None:
    import pickle

    refused = pickle.loads(pickle.dumps(StoreRefused("idempotency store refused: OOM x", "OOM")))
    assert isinstance(refused, StoreRefused) and refused.reason == "OOM"
    assert str(refused) == "idempotency store refused: OOM x"


def test_idemtask_bugs_are_not_store_failures_but_client_refusals_are() -> None:
    """The line of ``idemtask.store.failures``: what the client raises is the store's;
    a TypeError of idemtask's own code propagates unchanged, to be seen, not retried."""
    from idemtask.store.failures import guarded

    def bug() -> None:
        raise TypeError("unsupported operand")

    def encode() -> None:
        raise redis.exceptions.DataError("Invalid input of type: 'dict'")

    with pytest.raises(TypeError):
        guarded(bug)
    with pytest.raises(StoreUnavailable, match="Invalid input"):
        guarded(encode)


def test_a_cluster_none_of_whose_seeds_answers_yet_is_connected_on_first_use() -> None:
    """A worker may start while its cluster is down: building the store must not raise a
    client exception (the guard would never see it); calls fail as StoreUnreachable until
    the cluster answers, then work."""
    from servers_cluster import LocalCluster

    cluster = LocalCluster(primaries=1, replicas=0)
    url = f"redis+cluster://{USER}:{PASSWORD}@{LOOPBACK}:{cluster.nodes[0].port}"
    store = RedisStore.from_url(url, socket_timeout=2.0)
    with pytest.raises(StoreUnreachable) as raised:
        store.ping()
    _assert_no_secret({"ping": raised.value})
    try:
        cluster.start()
        for node in cluster.nodes:
            _with_user(node)
        assert store.is_cluster
        assert store.renew_many([_lease(store, "after")]) == [True]
    finally:
        cluster.close()
