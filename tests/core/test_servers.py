"""The test servers are real, isolated and survive what the tests do to them."""

from __future__ import annotations

from collections.abc import Callable

import pika
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from servers import RabbitMQServer, RedisServer, free_ports


def test_free_ports_are_distinct() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3


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
def test_rabbitmq_consumer_timeout_is_configured() -> None:
    with RabbitMQServer(consumer_timeout=12_345) as server:
        environment = server.ctl("environment")
        assert environment.returncode == 0, environment.stderr
        assert "{consumer_timeout,12345}" in environment.stdout
