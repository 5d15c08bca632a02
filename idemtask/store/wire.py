"""The store's short path for its single-key scripts on one server (standalone or Sentinel's
current primary): one connection per thread, EVALSHA packed once, the reply read directly.

Each transition is one EVALSHA, and the client's general command path costs more than the
round trip itself: a pool checkout and its readiness poll, the retry wrapper, the metrics
hooks, a fresh packing of every argument. Here each thread (in each process: a forked child
takes its own) keeps one connection made as the client's pool makes its own, so it has
exactly the host, database, credentials, TLS settings, timeouts, parser (hiredis when
installed) and retry policy the user configured; it is not counted against the pool's
``max_connections``. What the client's path guarantees is kept:

* before each call the connection is checked as the pool checks one it hands out: a server
  that closed it (a restart, an idle timeout) or unread data means a fresh connection,
  without spending a retry (one ``poll`` of the socket, the full check only when it is
  readable);
* a connection error or timeout disconnects and retries with the connection's ``Retry``
  (the backoff and count ``redis.Redis`` was given), exactly as ``Redis.execute_command``;
* ``NOSCRIPT`` loads the script on that connection and sends the call once more;
* an error reply leaves the connection usable; anything else that interrupts a call
  disconnects it, so a half-read reply can never be taken for the next one's;
* every exception is the client's own type, classified by ``idemtask.store.failures``.

A thread's connection is closed when the thread ends, or when the store is dropped;
``client.close()`` closes the pool's connections, not these.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.client import Pipeline
from redis.cluster import RedisCluster


def supports(client: Any) -> bool:
    """Whether ``client`` is a plain ``redis.Redis`` on a pool of its own connections
    (a standalone server or a Sentinel-managed primary), the case this path is for, in a
    process whose threads are real threads."""
    if not isinstance(client, redis.Redis) or isinstance(client, (Pipeline, RedisCluster)):
        return False
    if green_threads():
        return False
    pool = getattr(client, "connection_pool", None)
    # Client-side caching wraps the pool's connections in a proxy of its own: leave it alone.
    return isinstance(pool, redis.ConnectionPool) and getattr(pool, "cache", None) is None


def green_threads() -> bool:
    """Whether gevent or eventlet replaced ``threading`` (Celery's ``-P gevent`` and
    ``-P eventlet``): each greenlet is then a "thread", so a connection per thread would be
    a new connection per task; the pool's connections are shared by the tasks instead."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("threading"):
        return True
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    return eventlet_patcher is not None and bool(eventlet_patcher.is_monkey_patched("thread"))


class _Held:
    """One thread's connection and the process that opened it, closed when its thread ends
    or its caller is dropped (in a forked child, redis-py's ``disconnect`` closes only the
    child's copy of the socket and leaves the parent's connection be)."""

    __slots__ = ("__weakref__", "connection", "pid")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.pid = os.getpid()
        closing = weakref.finalize(self, connection.disconnect)
        closing.atexit = False


class ScriptCaller:
    """EVALSHA of one-key scripts over the calling thread's own connection."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool: redis.ConnectionPool = client.connection_pool
        self._local = threading.local()
        self._prefixes: dict[tuple[str, int], bytes] = {}
        # redis-py < 6 decides in the client whether a failed call is retried (it raises
        # unless the error is in retry_on_error); later versions leave it to Retry.
        self._legacy_failure: Callable[[Any, Exception], None] | None = getattr(
            client, "_disconnect_raise", None
        )

    def call(self, sha: str, source: Any, key: str, args: Sequence[Any]) -> Any:
        """``EVALSHA sha 1 key *args``; on NOSCRIPT, ``SCRIPT LOAD source`` and once more."""
        connection = self._connection()
        _make_ready(connection, self._pool)
        packed = self._pack(connection, sha, key, args)
        try:
            return self._round_trip(connection, (packed,))
        except redis.exceptions.NoScriptError:
            # The server lost its scripts (restart, flush, failover): load it on this
            # connection's server, then call once more; NOSCRIPT again is raised.
            self._round_trip(connection, connection.pack_command("SCRIPT", "LOAD", source))
            return self._round_trip(connection, (packed,))

    def _connection(self) -> Any:
        held: _Held | None = getattr(self._local, "held", None)
        if held is None or held.pid != os.getpid():
            held = _Held(self._open())
            self._local.held = held
        return held.connection

    def _open(self) -> Any:
        """A connection made as the pool makes its own (its class, its settings: host,
        database, credentials, TLS, timeouts, parser, retry), outside its count, so that
        threads holding one take nothing from a bounded pool. Connected on first send."""
        pool = self._pool
        return pool.connection_class(**dict(pool.connection_kwargs))

    def _pack(self, connection: Any, sha: str, key: str, args: Sequence[Any]) -> bytes:
        """The whole command as one buffer: the constant head (command, SHA, key count) is
        built once per script and argument count, each value encoded as the connection's
        encoder does for every command."""
        head = self._prefixes.get((sha, len(args)))
        if head is None:
            head = b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n$1\r\n1\r\n" % (
                len(args) + 4,
                len(sha),
                sha.encode(),
            )
            self._prefixes[(sha, len(args))] = head
        encode = connection.encoder.encode
        parts = [head]
        for value in (key, *args):
            data = encode(value)
            parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
        return b"".join(parts)

    def _round_trip(self, connection: Any, packed: Sequence[bytes]) -> Any:
        """Send the buffers, read one reply; retried as the connection's ``Retry`` says."""

        def send_and_read() -> Any:
            if getattr(connection, "_sock", None) is None:
                # A retry after a disconnect. The connection's own connect: a Sentinel
                # connection asks the sentinels for the primary here (a send would not).
                connection.connect()
            connection.send_packed_command(packed)
            return connection.read_response()

        legacy = self._legacy_failure

        def failed(error: Exception) -> None:
            if legacy is not None:
                legacy(connection, error)
            else:
                connection.disconnect()

        try:
            reply = connection.retry.call_with_retry(send_and_read, failed)
        except redis.exceptions.ResponseError:
            raise  # the reply was read whole: the connection is in step
        except BaseException:
            connection.disconnect()
            raise
        reconnect = getattr(connection, "should_reconnect", None)
        if reconnect is not None and reconnect():  # a server maintenance notice (redis-py ≥ 7)
            connection.disconnect()
        return reply


def _make_ready(connection: Any, pool: redis.ConnectionPool) -> None:
    """Connect, or drop a connection the server closed or that holds data nobody asked for
    (the call then connects again), as ``ConnectionPool.get_connection`` does."""
    sock = getattr(connection, "_sock", None)
    if sock is None:
        connection.connect()  # as the pool's checkout does: outside the command's retries
        return
    if not _readable(sock.fileno()):
        return  # nothing to read: in step, and the server has not hung up
    try:
        stale = connection.can_read()  # data, or a TLS record that carries none
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        stale = True
    else:
        # Server maintenance notices (redis-py ≥ 7, RESP3) arrive unasked: data the pool
        # keeps too, for the parser to handle with the next reply.
        notices = getattr(pool, "maint_notifications_enabled", None)
        stale = stale and not (notices is not None and notices())
    if stale:
        connection.disconnect()


def _readable(fd: int) -> bool:
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # Windows has no poll
