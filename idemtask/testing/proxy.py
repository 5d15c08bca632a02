"""A loopback TCP proxy that puts network faults between workers and a server.

``FaultyProxy`` listens on 127.0.0.1 and forwards every connection to an upstream loopback
port, in a thread of its own running an asyncio loop. While a fault lasts it can

* add latency: every chunk waits ``ms`` before it is forwarded, both ways;
* drop connections: every open connection is closed at once, and new ones are closed as
  soon as they are accepted;
* black-hole: connections stay open (new ones are accepted) but nothing is forwarded; what
  was sent meanwhile is delivered when the fault ends, as after a healed partition (so a
  request the client gave up on may still reach the server).

Each fault ends by itself after its duration. The proxy is bounded (at most
``max_connections`` at once; more are closed on accept) and stops by itself after
``lifetime`` seconds, so a forgotten proxy never outlives its run.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from typing import Any

LOOPBACK = "127.0.0.1"
CHUNK = 65536


class FaultyProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:upstream_port``, with faults on demand."""

    def __init__(
        self, upstream_port: int, *, max_connections: int = 512, lifetime: float = 3600.0
    ) -> None:
        self.upstream_port = upstream_port
        self.max_connections = max_connections
        self.lifetime = lifetime
        self.port = 0
        self.accepted = 0
        self.dropped = 0
        self._latency = 0.0  # seconds added to every chunk while now < _latency_until
        self._latency_until = 0.0
        self._drop_until = 0.0
        self._hole_until = 0.0
        self._loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None  # set while nothing is black-holed
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> FaultyProxy:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), name="idemtask-faulty-proxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(10) or self._server is None:
            raise RuntimeError("the fault proxy did not start listening")
        return self

    def close(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        stopped = self._stopped
        if stopped is not None:
            self._loop.call_soon_threadsafe(stopped.set)
        self._thread.join(10)

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- faults (call from any thread) ----------------------------------------------------

    def add_latency(self, ms: float, seconds: float) -> None:
        self._latency = ms / 1000
        self._latency_until = time.monotonic() + seconds

    def drop(self, seconds: float) -> None:
        """Close every open connection now, and every new one for ``seconds``."""
        self._drop_until = time.monotonic() + seconds
        self._call(self._drop_all())

    def black_hole(self, seconds: float) -> None:
        """Forward nothing for ``seconds``; connections stay open and new ones are accepted."""
        self._hole_until = time.monotonic() + seconds
        self._call(self._close_hole(seconds))

    @property
    def faulty(self) -> bool:
        now = time.monotonic()
        return now < max(self._latency_until, self._drop_until, self._hole_until)

    # -- the loop -------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(ready))
        finally:
            self._loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), self.lifetime)
        self._server.close()
        await self._drop_all()
        await self._server.wait_closed()

    async def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _close_hole(self, seconds: float) -> None:
        assert self._open is not None
        self._open.clear()
        await asyncio.sleep(seconds)
        if time.monotonic() >= self._hole_until:
            self._open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if time.monotonic() < self._drop_until or len(self._writers) >= self.max_connections:
            self.dropped += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
        except OSError:  # the server is down (restarting): the client sees a closed socket
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for one in (writer, up_writer):
                self._writers.discard(one)
                one.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        try:
            while data := await reader.read(CHUNK):
                await self._open.wait()
                if time.monotonic() < self._latency_until:
                    await asyncio.sleep(self._latency)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
