"""idemtask's Prometheus metrics on a Dramatiq worker, served by Dramatiq's own endpoint.

Dramatiq's ``Prometheus`` middleware switches every worker process to ``prometheus_client``'s
multiprocess mode when it boots and serves the sum on ``dramatiq_prom_host`` and
``dramatiq_prom_port`` (9191 by default). Add this middleware beside it, in either order::

    broker.add_middleware(Prometheus())
    broker.add_middleware(IdempotencyMetrics())
"""

from __future__ import annotations

import os

from dramatiq.broker import Broker
from dramatiq.middleware import Middleware
from dramatiq.middleware.prometheus import DB_PATH

from idemtask.contrib.prometheus import MULTIPROC_ENV, install


class IdempotencyMetrics(Middleware):
    """Counts idemtask's decisions in each worker process, in Dramatiq's multiprocess
    directory. ``prometheus_client`` picks its mode when first imported, and hooks run in
    reverse order: the directory is set here too, so neither middleware's order matters."""

    def after_process_boot(self, broker: Broker) -> None:
        os.environ.setdefault(MULTIPROC_ENV, DB_PATH)
        os.environ.setdefault(MULTIPROC_ENV.lower(), DB_PATH)
        install()
