"""The suite's real servers: ``RedisServer`` (the one users get from
``idemtask.testing.launcher``) and a throwaway RabbitMQ node.

Each server runs on 127.0.0.1 and a free port, with all of its files in its own temporary
directory, so tests never touch a system-wide instance. A missing binary is an error
(``RuntimeError``), never a skip: the suite is only green when it ran against real servers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

from idemtask.testing.launcher import (
    LOOPBACK,
    RedisServer,
    ServerProcess,
    find_binary,
    free_port,
    free_ports,
    terminate_session,
)

__all__ = [
    "LOOPBACK",
    "RabbitMQServer",
    "RedisServer",
    "free_port",
    "free_ports",
    "terminate_session",
]


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


class RabbitMQServer(ServerProcess):
    """A throwaway RabbitMQ node on 127.0.0.1 and a free AMQP port.

    The node (``idemtask-test-<port>@localhost``) keeps its database, logs, config and Erlang
    cookie in its own directory, runs without plugins and shares only the Erlang port mapper
    (epmd) with other nodes. ``consumer_timeout`` (milliseconds) is written to its
    ``rabbitmq.conf``.

    A restart keeps the AMQP port (clients reconnect to the URL they have): it starts the new
    node only once every process of the old one is gone and the port is free again. The
    distribution port, which only ``rabbitmqctl`` uses (it finds it through epmd), is a
    fresh one at each start.
    """

    name = "rabbitmq-server"
    start_timeout = 90.0
    #: Seconds a stopped node's processes get to exit after SIGKILL.
    exit_timeout = 30.0
    _DIRS = ("/usr/lib/rabbitmq/bin", "/usr/sbin", "/usr/local/sbin")

    def __init__(self, *, consumer_timeout: int | None = None) -> None:
        self.binary = find_binary("rabbitmq-server", self._DIRS)
        self.ctl_binary = find_binary("rabbitmqctl", [str(Path(self.binary).parent)])
        self.epmd_binary = find_binary("epmd", ["/usr/lib/erlang/bin"])  # Erlang's, not RabbitMQ's
        self.port, self.dist_port, self.epmd_port = free_ports(3)
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

    def ports(self) -> list[int]:
        return [self.port]  # not epmd's: it stays up across restarts, as on a real host

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [self.epmd_binary, "-port", str(self.epmd_port), "-kill"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=10,
                check=False,
            )

    def start(self) -> RabbitMQServer:
        if not self.running:
            self.dist_port = free_port()
        return super().start()

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        # The leader has children (the Erlang VM under rabbitmq-server's script): wait until
        # every one is gone, or the next start would meet the old node still holding its
        # port, its epmd name and its database.
        members = _group_members(proc.pid)
        super()._kill_group(proc)
        deadline = time.monotonic() + self.exit_timeout
        while left := [pid for pid in members if _alive(pid)]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: processes {left} still alive after SIGKILL")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            HOME=str(self.dir),  # the server and rabbitmqctl share this .erlang.cookie
            # The node's own Erlang port mapper, on loopback only: epmd outlives the node
            # that started it, so ``close`` stops it (a shared one would stay behind,
            # listening on every interface).
            ERL_EPMD_ADDRESS=LOOPBACK,
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS=LOOPBACK,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            # Erlang distribution on loopback only, like the AMQP listener
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
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
