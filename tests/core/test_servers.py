"""The test servers are real, isolated and survive what the tests do to them."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from idemtask.testing import launcher

from servers import RabbitMQServer, RedisServer, free_port, free_ports


def test_free_ports_are_distinct() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3


def test_free_ports_are_below_the_kernels_ephemeral_range() -> None:
    """The kernel never hands such a port to a client's connect, so a client reconnecting
    while a server restarts cannot be given the server's own port."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(20)
    assert all(1024 <= port < low for port in ports), ports


@contextmanager
def _port_held_by_a_client(port: int, seconds: float) -> Iterator[None]:
    """A connection whose local end is ``127.0.0.1:port``, released after ``seconds``: what
    holds a stopped server's port when a client was given it, or the old process lingers.
    The far end closes first, so no TIME_WAIT is left on ``port`` afterwards."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.socket()
        client.bind(("127.0.0.1", port))
        client.connect(listener.getsockname())
        peer, _ = listener.accept()

        def release() -> None:
            peer.close()
            client.recv(1)  # the far end's FIN
            client.close()

        timer = threading.Timer(seconds, release)
        timer.start()
        try:
            yield
        finally:
            timer.join()
            peer.close()
            client.close()


def test_session_redis_answers(redis_server: RedisServer, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        client.set(b"key", b"value")
        assert client.get(b"key") == b"value"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
    finally:
        client.close()


@pytest.mark.parametrize("run", ["first", "second"])
def test_redis_url_is_flushed_before_each_test(redis_url: str, run: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
        client.set(b"left-over", run.encode())
    finally:
        client.close()


def test_fresh_redis_keeps_appendonly_data_across_restart(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    server = fresh_redis(appendonly=True)
    port = server.port
    client = server.client()
    client.set(b"kept", b"yes")
    client.close()

    server.restart()

    assert server.port == port
    client = server.client()
    try:
        assert client.get(b"kept") == b"yes"
    finally:
        client.close()


def test_fresh_redis_keeps_appendonly_data_after_kill(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    server = fresh_redis(appendonly=True)
    client = server.client()
    client.set(b"kept", b"yes")
    client.close()

    server.kill()
    assert not server.running
    server.start()

    client = server.client()
    try:
        assert client.get(b"kept") == b"yes"
    finally:
        client.close()


def test_fresh_redis_without_appendonly_forgets_on_restart(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    server = fresh_redis()
    client = server.client()
    client.set(b"gone", b"soon")
    client.close()

    server.restart()

    client = server.client()
    try:
        assert client.get(b"gone") is None
    finally:
        client.close()


def test_stopped_redis_refuses_connections(fresh_redis: Callable[..., RedisServer]) -> None:
    server = fresh_redis()
    server.stop()
    client = server.client(socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        client.close()


def test_fresh_redis_takes_extra_config(fresh_redis: Callable[..., RedisServer]) -> None:
    server = fresh_redis(config={"maxmemory-policy": "allkeys-lru"})
    client = server.client()
    try:
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    finally:
        client.close()


def test_redis_start_waits_until_its_port_is_free(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    server = fresh_redis(appendonly=True)
    client = server.client()
    client.set(b"kept", b"yes")
    client.close()
    server.stop()

    with _port_held_by_a_client(server.port, 1.0):
        server.start()

    client = server.client()
    try:
        assert client.get(b"kept") == b"yes"
    finally:
        client.close()


def test_missing_binary_is_an_error_not_a_skip() -> None:
    with pytest.raises(RuntimeError, match="not found"):
        RedisServer(binary="redis-server-that-does-not-exist")


def _publish(url: str, queue: str, body: bytes) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


def _get(url: str, queue: str) -> bytes | None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        _method, _properties, body = channel.basic_get(queue, auto_ack=True)
        assert body is None or isinstance(body, bytes)
        return body
    finally:
        connection.close()


@pytest.mark.rabbitmq
def test_rabbitmq_round_trip(rabbitmq_server: RabbitMQServer) -> None:
    assert rabbitmq_server.url.startswith("amqp://guest:guest@127.0.0.1:")
    _publish(rabbitmq_server.url, "idemtask-test-round-trip", b"hello")
    assert _get(rabbitmq_server.url, "idemtask-test-round-trip") == b"hello"
    assert _get(rabbitmq_server.url, "idemtask-test-round-trip") is None


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of every TCP socket listening on ``port`` (from /proc/net)."""
    found: set[str] = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, words))
    return found


@pytest.mark.rabbitmq
def test_a_test_node_has_its_own_port_mapper_on_loopback_and_stops_it() -> None:
    """epmd outlives the node that started it: it must listen on loopback only, and go
    when the node is closed rather than stay behind after the suite."""
    with RabbitMQServer() as server:
        listening = _listening_addresses(server.epmd_port)
        assert listening and listening <= {"127.0.0.1", "::1"}, listening
        assert server.ctl("status").returncode == 0  # rabbitmqctl finds the node through it
    assert _listening_addresses(server.epmd_port) == set()


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_rabbitmq_restart_and_kill(rabbitmq_server: RabbitMQServer) -> None:
    _publish(rabbitmq_server.url, "idemtask-test-durable", b"persistent")
    rabbitmq_server.restart()
    assert _get(rabbitmq_server.url, "idemtask-test-durable") == b"persistent"

    rabbitmq_server.kill()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        _get(rabbitmq_server.url, "idemtask-test-durable")
    rabbitmq_server.start()
    # (a get acked just before a kill may come back: RabbitMQ writes acks lazily)
    _publish(rabbitmq_server.url, "idemtask-test-after-kill", b"again")
    assert _get(rabbitmq_server.url, "idemtask-test-after-kill") == b"again"


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_rabbitmq_restarts_in_a_row_and_serves_after_each(
    rabbitmq_server: RabbitMQServer,
) -> None:
    port = rabbitmq_server.port
    for restart in range(3):
        body = f"before restart {restart}".encode()
        _publish(rabbitmq_server.url, "idemtask-test-restarts", body)
        rabbitmq_server.restart()
        assert rabbitmq_server.port == port  # clients keep their URL
        assert _get(rabbitmq_server.url, "idemtask-test-restarts") == body


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_rabbitmq_start_waits_until_its_port_is_free(rabbitmq_server: RabbitMQServer) -> None:
    _publish(rabbitmq_server.url, "idemtask-test-port-wait", b"kept")
    rabbitmq_server.stop()

    with _port_held_by_a_client(rabbitmq_server.port, 3.0):
        rabbitmq_server.start()

    assert _get(rabbitmq_server.url, "idemtask-test-port-wait") == b"kept"


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_rabbitmq_consumer_timeout_is_configured() -> None:
    with RabbitMQServer(consumer_timeout=12_345) as server:
        environment = server.ctl("environment")
        assert environment.returncode == 0, environment.stderr
        assert "{consumer_timeout,12345}" in environment.stdout


@pytest.mark.parametrize("where", ["below the ephemeral range", "from the kernel"])
def test_free_ports_never_hands_out_a_port_twice(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Servers are made (their ports picked) before any of them listens: picked only as
    "free a moment ago", two nodes of one cluster could be given the same port. It holds on
    both ways a port is found, the second for a machine whose ephemeral range is unknown."""
    if where == "from the kernel":
        monkeypatch.setattr(launcher, "_ephemeral_range", lambda: None)
    picked = [free_port() for _ in range(400)]
    picked += free_ports(100)
    assert len(set(picked)) == len(picked)
