"""``python tests/chaos/long_run.py ARGS``: the chaos command on a throwaway RabbitMQ node.

The same arguments as ``python -m idemtask.testing.chaos``; with ``--broker rabbitmq`` the
scenario runs on a node started here (``tests/servers.py``), which the broker restarts stop
and start again on the same port. Run from the repository root.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `servers`

from idemtask.testing.chaos.__main__ import main, parse

from servers import RabbitMQServer


def run(argv: list[str]) -> int:
    if parse(argv).broker != "rabbitmq":
        return main(argv)
    with RabbitMQServer() as node:
        return main(argv, rabbitmq=node)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
