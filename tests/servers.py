"""The suite's real servers are the ones users get in ``idemtask.testing.servers``."""

from idemtask.testing.servers import (
    LOOPBACK,
    RabbitMQServer,
    RedisServer,
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
