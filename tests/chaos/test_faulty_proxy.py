"""The fault proxy in front of a real redis-server: it forwards, drops connections,
black-holes them for a while and recovers from each fault by itself."""

from __future__ import annotations

import time

import pytest
import redis

from idemtask.testing.proxy import FaultyProxy

from servers import RedisServer


def _client(proxy: FaultyProxy, timeout: float = 5.0) -> redis.Redis:
    return redis.Redis.from_url(proxy.url, socket_timeout=timeout, socket_connect_timeout=timeout)


def _until_up(client: redis.Redis, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_the_proxy_forwards_and_adds_latency(redis_server: RedisServer) -> None:
    with FaultyProxy(redis_server.port) as proxy:
        client = _client(proxy)
        client.set("proxy:k", "v")
        proxy.add_latency(50, seconds=5)
        assert proxy.faulty
        assert client.get("proxy:k") == b"v"  # slower, but every reply arrives, in order
        assert [client.incr("proxy:n") for _ in range(3)] == [1, 2, 3]
        client.close()


def test_a_drop_closes_open_connections_then_the_proxy_accepts_again(
    redis_server: RedisServer,
) -> None:
    with FaultyProxy(redis_server.port) as proxy:
        client = _client(proxy)
        client.ping()
        proxy.drop(seconds=0.5)
        with pytest.raises(redis.ConnectionError):
            client.ping()  # the open connection is gone, and a new one is refused
        _until_up(client)
        assert proxy.dropped >= 1
        client.close()


def test_a_black_hole_times_requests_out_then_delivers_what_was_held(
    redis_server: RedisServer,
) -> None:
    with FaultyProxy(redis_server.port) as proxy:
        client = _client(proxy, timeout=0.3)
        client.delete("proxy:held")
        proxy.black_hole(seconds=1.5)
        with pytest.raises(redis.TimeoutError):
            client.set("proxy:held", "late")  # the client gives up; the request is held
        direct = redis_server.client()
        assert direct.get("proxy:held") is None
        deadline = time.monotonic() + 10
        while direct.get("proxy:held") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # The hole healed and the request the client gave up on still reached the server.
        assert direct.get("proxy:held") == b"late"
        _until_up(client)
        direct.close()
        client.close()


def test_the_proxy_stops_by_itself_after_its_lifetime(redis_server: RedisServer) -> None:
    proxy = FaultyProxy(redis_server.port, lifetime=0.5).start()
    assert proxy._thread is not None
    proxy._thread.join(10)
    assert not proxy._thread.is_alive()
    with pytest.raises(redis.ConnectionError):
        _client(proxy, timeout=1).ping()
