"""Broker and middleware settings that fit the idempotency lease.

Dramatiq acks only after a message is processed, so a crash always means redelivery; these
values decide *when* and keep the redelivery cheap::

    preset = presets.at_least_once(lease=60, time_limit=600)
    broker = RedisBroker(url=..., middleware=preset.middleware(), **preset.redis_broker)
    broker.add_middleware(IdempotencyMiddleware(redis_url=..., **preset.idemtask), before=Retries)

Why each value:

* ``heartbeat_timeout`` (RedisBroker) is when a dead worker's unacked messages are put back.
  It is set above the lease: by the time the copy is redelivered, the dead attempt's lease
  has run out (it is renewed only while its process lives), so the copy takes the key over
  at once instead of being deferred until the lease ends.
* ``dead_message_ttl`` keeps dead letters at least as long as idemtask keeps results, so a
  dead letter requeued by an operator still replays instead of running again.
* ``time_limit`` (TimeLimit) must be finite: a hung body keeps renewing its lease, and every
  other delivery of its key is deferred for as long as it hangs. It must exceed
  ``wait_timeout``, because the ``wait`` policy waits inside the time limit.
* Retries: a failed attempt gives its key back at once, so a retry re-enters immediately;
  ``min_backoff`` only spaces retries for the downstream's sake. Deferrals of a busy key
  never count against ``max_retries``.
* RabbitMQ ``consumer_timeout`` (a server setting, 30 min by default) closes the channel of
  a consumer that holds a message unacked longer, redelivering everything it holds. It must
  exceed the time a prefetched message can wait plus run: ``rabbitmq_consumer_timeout_ms``
  assumes a prefetch of one message per worker thread (``dramatiq_queue_prefetch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dramatiq.middleware import Middleware, Retries, TimeLimit, default_middleware

from idemtask.errors import ConfigurationError
from idemtask.policy import Policy, check_seconds

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
HEARTBEAT_MARGIN_MS = 5_000
MIN_HEARTBEAT_TIMEOUT_MS = 15_000


@dataclass(frozen=True, slots=True)
class AtLeastOnce:
    """Validated values; use the properties to pass them to Dramatiq and idemtask."""

    lease: float
    time_limit_ms: int
    heartbeat_timeout_ms: int
    dead_message_ttl_ms: int
    result_ttl: float
    max_retries: int
    min_backoff_ms: int
    max_backoff_ms: int
    rabbitmq_consumer_timeout_ms: int

    @property
    def redis_broker(self) -> dict[str, int]:
        """Keyword arguments for ``RedisBroker(...)``."""
        return {
            "heartbeat_timeout": self.heartbeat_timeout_ms,
            "dead_message_ttl": self.dead_message_ttl_ms,
        }

    @property
    def rabbitmq_conf(self) -> str:
        """The line to put in ``rabbitmq.conf`` (the server's setting, not the client's)."""
        return f"consumer_timeout = {self.rabbitmq_consumer_timeout_ms}"

    @property
    def idemtask(self) -> dict[str, Any]:
        """Settings for ``IdempotencyMiddleware(...)`` that these values were computed for
        (typed ``Any`` so ``**preset.idemtask`` type-checks against its keyword arguments)."""
        return {"lease": self.lease, "result_ttl": self.result_ttl}

    def time_limit(self) -> TimeLimit:
        return TimeLimit(time_limit=self.time_limit_ms)

    def retries(self) -> Retries:
        return Retries(
            max_retries=self.max_retries,
            min_backoff=self.min_backoff_ms,
            max_backoff=self.max_backoff_ms,
        )

    def middleware(self) -> list[Middleware]:
        """Dramatiq's default stack, with TimeLimit and Retries set to these values."""
        stack: list[Middleware] = []
        for cls in default_middleware:
            if cls is TimeLimit:
                stack.append(self.time_limit())
            elif cls is Retries:
                stack.append(self.retries())
            else:
                stack.append(cls())
        return stack


def at_least_once(
    *,
    lease: float = 60.0,
    time_limit: float = 600.0,
    result_ttl: float = 86_400.0,
    wait_timeout: float = 0.0,
    max_retries: int = 10,
    min_backoff: float = 1.0,
    max_backoff: float = 300.0,
) -> AtLeastOnce:
    """Settings for at-least-once delivery with a lease of ``lease`` seconds.

    ``time_limit`` bounds one run of a body (seconds); ``wait_timeout`` is the idemtask
    setting, only relevant with ``on_running="wait"``.
    """
    source = "presets.at_least_once"
    # idemtask's own values are checked as the middleware will check them: any positive
    # result_ttl is safe with any lease (docs/architecture.md, "Record lifetime").
    given = {"lease": lease, "result_ttl": result_ttl, "wait_timeout": wait_timeout}
    Policy().with_options(given, source=source)
    for name, seconds in {"min_backoff": min_backoff, "max_backoff": max_backoff}.items():
        check_seconds(name, seconds, source=source)
    if not math.isfinite(time_limit) or time_limit <= 0:
        raise ConfigurationError(
            "time_limit must be a finite number of seconds: a hung body would renew its "
            "lease for ever and hold its key"
        )
    if time_limit <= wait_timeout:
        raise ConfigurationError(
            f"time_limit ({time_limit}s) must exceed wait_timeout ({wait_timeout}s): the "
            "wait policy waits inside the time limit"
        )
    if max_retries < 0 or min_backoff <= 0 or max_backoff < min_backoff:
        raise ConfigurationError("need max_retries >= 0 and 0 < min_backoff <= max_backoff")
    lease_ms = int(lease * 1000)
    time_limit_ms = int(time_limit * 1000)
    return AtLeastOnce(
        lease=lease,
        time_limit_ms=time_limit_ms,
        heartbeat_timeout_ms=max(MIN_HEARTBEAT_TIMEOUT_MS, lease_ms + HEARTBEAT_MARGIN_MS),
        dead_message_ttl_ms=max(WEEK_MS, int(result_ttl * 1000)),
        result_ttl=result_ttl,
        max_retries=max_retries,
        min_backoff_ms=int(min_backoff * 1000),
        max_backoff_ms=int(max_backoff * 1000),
        # one run, one prefetched message waiting behind it, and a lease of slack
        rabbitmq_consumer_timeout_ms=2 * time_limit_ms + lease_ms + 60_000,
    )


def describe(preset: AtLeastOnce) -> dict[str, Any]:
    """The values as one flat dict, for logs and the doctor."""
    return {
        "lease": preset.lease,
        "time_limit_ms": preset.time_limit_ms,
        **preset.redis_broker,
        "max_retries": preset.max_retries,
        "min_backoff_ms": preset.min_backoff_ms,
        "max_backoff_ms": preset.max_backoff_ms,
        "rabbitmq_consumer_timeout_ms": preset.rabbitmq_consumer_timeout_ms,
    }
