"""Throwaway ``redis-server`` processes on loopback ports, for the fixtures and the chaos runner.

Each server runs on 127.0.0.1 and a free port, with all of its files in its own temporary
directory, so nothing touches a system-wide instance. A missing binary is an error
(``RuntimeError``), never a skip.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis

LOOPBACK = "127.0.0.1"
#: Seconds ``start`` waits for a server's ports to be free again (after a restart): longer
#: than Linux keeps a connection in TIME_WAIT (60 s).
PORT_WAIT = 75.0

_S = TypeVar("_S", bound="ServerProcess")


def _ephemeral_range() -> tuple[int, int] | None:
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return None


def port_is_free(port: int) -> bool:
    """True when a listener could bind ``127.0.0.1:port`` now (``SO_REUSEADDR``, as servers do,
    so connections of a previous server in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


#: Ports this process already handed out: a server is often made (its port picked) well
#: before it listens, so "free a moment ago" alone could give two servers one port.
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago, and never handed out
    before by this process.

    They are taken below the kernel's ephemeral range where it is known: the kernel never
    hands those out to a ``connect`` or a ``bind`` to port 0, so while a server is down for a
    restart no other process (nor a client reconnecting to it) is given its port.
    """
    with _handed_out_lock:
        ports = _below_ephemeral(count) or _from_kernel(count)
        _handed_out.update(ports)
        return ports


def _below_ephemeral(count: int) -> list[int]:
    """Free ports below the ephemeral range; empty when that range is unknown or too low."""
    span = _ephemeral_range()
    if span is None or span[0] <= 2048:
        return []
    low, high = max(1024, span[0] - 10_000), span[0] - 1
    if len(_handed_out) > (high - low) // 2:
        _handed_out.clear()  # a long session: the oldest servers are long gone
    ports: list[int] = []
    for port in random.sample(range(low, high + 1), high - low + 1):
        if port not in _handed_out and port_is_free(port):
            ports.append(port)
            if len(ports) == count:
                return ports
    return []


def _from_kernel(count: int) -> list[int]:
    """Ports the kernel gives a bind to port 0, all held at once so that they differ."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
            port = sock.getsockname()[1]
            if port not in _handed_out:
                ports.append(port)
        return ports
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A loopback port that was free a moment ago (see ``free_ports``)."""
    return free_ports(1)[0]


def find_binary(name: str, extra_dirs: Sequence[str] = ()) -> str:
    """Path of the executable ``name``: in ``extra_dirs`` or on ``PATH``; RuntimeError if none."""
    for directory in extra_dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        looked = ", ".join(["PATH", *extra_dirs])
        raise RuntimeError(
            f"{name} not found (looked in {looked}): a real server is needed; install it "
            f"(the {name} package of your system) or put it on PATH"
        )
    return found


def terminate_session(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it forked (a
    Celery parent and its pool children): SIGTERM the session, SIGKILL it after ``grace``
    seconds, then SIGKILL whatever of the session is left behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # pool children left behind


class ServerProcess:
    """A server process in its own session and temporary directory.

    ``stop``/``start``/``restart`` keep the port and the directory, so a server restarted
    with persistence enabled comes back with its data; ``start`` waits until the ports of
    ``ports()`` are free again before it launches the process. ``close`` stops it and
    removes the directory.
    """

    name = "server"
    start_timeout = 30.0

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"idemtask-{self.name}-"))
        self._log = self.dir / "process.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None  # seconds the last start took

    # -- what a subclass provides -------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def _log_files(self) -> list[Path]:
        return [self._log]

    def ports(self) -> list[int]:
        """The loopback ports the server listens on."""
        return []

    # -- life cycle -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self: _S) -> _S:
        """Start the server (no-op if it runs) and wait until it serves requests."""
        if self.running:
            return self
        self._wait_ports_free(time.monotonic() + PORT_WAIT)
        began = time.monotonic()
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(began + self.start_timeout)
        except BaseException:
            self.kill()
            raise
        self.started_in = time.monotonic() - began
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown (SIGTERM); SIGKILL if it takes longer than ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self._kill_group(proc)

    def kill(self) -> None:
        """SIGKILL the server and everything it started in its session: a crash."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._kill_group(proc)

    def restart(self: _S) -> _S:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self: _S) -> _S:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _wait_ports_free(self, deadline: float) -> None:
        """Wait until nothing holds the server's ports (a previous run of it still dying, or
        another process); RuntimeError naming the port after ``deadline``."""
        for port in self.ports():
            while not port_is_free(port):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name}: port {port} on {LOOPBACK} is still in use; "
                        "cannot start the server on it"
                    )
                time.sleep(0.05)

    # -- diagnostics ----------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise RuntimeError(f"{self.name} exited ({code}) while starting\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in self._log_files():
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)


class RedisServer(ServerProcess):
    """A ``redis-server`` on 127.0.0.1 and a free port.

    By default nothing is persisted (``--save "" --appendonly no``). With
    ``appendonly=True`` every write is fsynced to the append-only file before the reply
    (``appendfsync`` ``always`` unless told otherwise), so the data survives ``restart()``
    and even ``kill()``. ``config`` adds further ``redis-server --name value`` settings.
    """

    name = "redis-server"
    start_timeout = 20.0

    def __init__(
        self,
        *,
        appendonly: bool = False,
        appendfsync: str = "always",
        config: Mapping[str, str] | None = None,
        binary: str = "redis-server",
    ) -> None:
        self.binary = find_binary(binary)
        self.port = free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.config = dict(config or {})
        super().__init__()

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def ports(self) -> list[int]:
        bus = self.config.get("cluster-port")  # a cluster node's second listener
        return [self.port] if bus is None else [self.port, int(bus)]

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new client (bytes replies); close it when done."""
        return redis.Redis(host=LOOPBACK, port=self.port, db=0, decode_responses=False, **kwargs)

    def _command(self) -> list[str]:
        command = [
            self.binary,
            "--bind", LOOPBACK,
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", "",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
        ]  # fmt: skip
        for option, value in self.config.items():
            command += [f"--{option}", value]
        return command

    def _wait_ready(self, deadline: float) -> None:
        client = self.client(socket_connect_timeout=0.5, socket_timeout=2.0)
        try:
            while True:
                self._check_alive()
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:  # not listening yet, or still loading the AOF
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not answer PING\n{self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()
