"""The chaos command's RabbitMQ node given by URL, and restarted by the user's command."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pika
import pytest

from idemtask.testing.chaos.broker import ExternalRabbitMQ

from servers import RabbitMQServer

pytestmark = [pytest.mark.chaos]


@pytest.mark.rabbitmq
def test_an_external_node_is_restarted_by_its_command(rabbitmq_server: RabbitMQServer) -> None:
    server = rabbitmq_server
    ctl = shlex.join([
        "env", f"HOME={server.dir}", f"ERL_EPMD_PORT={server.epmd_port}",
        server.ctl_binary, "-n", server.node,
    ])  # fmt: skip
    command = shlex.join(["sh", "-c", f"{ctl} stop_app && {ctl} start_app"])
    node = ExternalRabbitMQ(server.url, command)
    connection = pika.BlockingConnection(pika.URLParameters(server.url))

    node.restart()

    with pytest.raises(pika.exceptions.AMQPConnectionError):  # it really went down
        connection.process_data_events(time_limit=1)
    pika.BlockingConnection(pika.URLParameters(server.url)).close()  # and serves again


def test_the_rabbitmq_scenario_without_a_node_is_refused_clearly() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "idemtask.testing.chaos", "--framework", "dramatiq",
         "--broker", "rabbitmq", "--keys", "5"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--broker rabbitmq needs --rabbitmq-url" in done.stderr


def test_a_restart_without_a_command_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="--rabbitmq-restart"):
        ExternalRabbitMQ("amqp://guest:guest@127.0.0.1:1/").restart()
