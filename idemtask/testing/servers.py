"""Real ``redis-server`` and ``rabbitmq-server`` processes for tests (yours and ours).

Each server runs on 127.0.0.1 and a free port, with all of its files in its own temporary
directory, so tests never touch a system-wide instance. A missing binary is an error
(``RuntimeError``), never a skip: the suite is only green when it ran against real servers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis

LOOPBACK = "127.0.0.1"

_S = TypeVar("_S", bound="_ServerProcess")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    return free_ports(1)[0]


def _find_binary(name: str, extra_dirs: Sequence[str] = ()) -> str:
    for directory in extra_dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"{name} not found (looked in PATH and {', '.join(extra_dirs) or 'nothing else'}): "
            "the tests need a real server; run scripts/test, which installs it"
        )
    return found


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _group_members(pgid: int) -> list[int]:
    if not Path("/proc").is_dir():
        return []
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and fields[2] == str(pgid):
                members.append(int(entry.name))
    return members


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


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


class _ServerProcess:
    """A server process in its own session and temporary directory.

    ``stop``/``start``/``restart`` keep the port and the directory, so a server restarted
    with persistence enabled comes back with its data. ``close`` stops it and removes the
    directory.
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

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        # The leader may have children (the Erlang VM under rabbitmq-server's script): wait
        # until every one is gone, or a restart could meet the old node still dying.
        members = _group_members(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in members) and time.monotonic() < deadline:
            time.sleep(0.01)

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


class RedisServer(_ServerProcess):
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
        self.binary = _find_binary(binary)
        self.port = free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.config = dict(config or {})
        super().__init__()

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

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


class RabbitMQServer(_ServerProcess):
    """A throwaway RabbitMQ node on 127.0.0.1 and a free AMQP port.

    The node (``idemtask-test-<port>@localhost``) keeps its database, logs, config and Erlang
    cookie in its own directory, runs without plugins and shares only the Erlang port mapper
    (epmd) with other nodes. ``consumer_timeout`` (milliseconds) is written to its
    ``rabbitmq.conf``.
    """

    name = "rabbitmq-server"
    start_timeout = 90.0
    _DIRS = ("/usr/lib/rabbitmq/bin", "/usr/sbin", "/usr/local/sbin")

    def __init__(self, *, consumer_timeout: int | None = None) -> None:
        self.binary = _find_binary("rabbitmq-server", self._DIRS)
        self.ctl_binary = _find_binary("rabbitmqctl", [str(Path(self.binary).parent)])
        self.port, self.dist_port = free_ports(2)
        self.node = f"idemtask-test-{self.port}@localhost"
        self.consumer_timeout = consumer_timeout
        super().__init__()
        conf = ["loopback_users.guest = true", "log.file.level = info"]
        if consumer_timeout is not None:
            conf.append(f"consumer_timeout = {int(consumer_timeout)}")
        (self.dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            HOME=str(self.dir),  # the server and rabbitmqctl share this .erlang.cookie
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS=LOOPBACK,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
        )
        return env

    def _command(self) -> list[str]:
        return [self.binary]

    def _log_files(self) -> list[Path]:
        return [self._log, *sorted((self.dir / "log").glob("*.log"))]

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n <node> ARGS`` against this node."""
        return subprocess.run(
            [self.ctl_binary, "-n", self.node, *args],
            env=self._env(),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _wait_ready(self, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=0.5).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not open its AMQP port\n{self.log_tail()}")
            time.sleep(0.1)
        while True:
            left = max(1, int(deadline - time.monotonic()))
            try:
                done = self.ctl("await_startup", "--timeout", str(left), timeout=left + 15)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"rabbitmqctl await_startup hung\n{self.log_tail()}") from exc
            if done.returncode == 0:
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rabbitmqctl await_startup failed ({done.returncode}): "
                    f"{done.stdout}{done.stderr}\n{self.log_tail()}"
                )
            time.sleep(0.5)
