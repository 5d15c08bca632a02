"""The RabbitMQ node of the RabbitMQ scenario: one the caller runs, given to the runner.

The runner only needs the node's AMQP URL and, for ``broker_restart`` faults, a way to
restart it that returns once the node serves again. Any object with ``url`` and
``restart()`` will do (the project's test suite passes its own throwaway node);
``ExternalRabbitMQ`` is a running node plus a shell command that restarts it.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


class Broker(Protocol):
    """A running broker: its URL, and a restart that returns when it serves again."""

    @property
    def url(self) -> str: ...

    def restart(self) -> object: ...


@dataclass
class ExternalRabbitMQ:
    """A RabbitMQ node that the caller runs (``--rabbitmq-url``), restarted for a
    ``broker_restart`` fault by ``restart_command`` (``--rabbitmq-restart``)."""

    url: str
    restart_command: str | None = None
    timeout: float = 120.0

    def restart(self) -> None:
        if not self.restart_command:
            raise RuntimeError("broker restarts need a restart command (--rabbitmq-restart)")
        subprocess.run(shlex.split(self.restart_command), check=True, timeout=self.timeout)
        self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until the node accepts connections on its AMQP port."""
        parts = urlsplit(self.url)
        address = (parts.hostname or "127.0.0.1", parts.port or 5672)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                socket.create_connection(address, timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"RabbitMQ at {address[0]}:{address[1]} did not come back "
                        f"within {self.timeout:.0f}s"
                    ) from None
                time.sleep(0.2)
