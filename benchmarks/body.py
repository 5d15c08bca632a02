"""The task body every variant of both frameworks runs, so they differ only in the guard."""

from __future__ import annotations

import time

#: Body durations the end-to-end sections measure, in milliseconds.
BODIES_MS = (0.0, 1.0, 10.0)


def body(n: int, body_ms: float) -> int:
    """``body_ms`` of sleep (no CPU: the time a body waits on I/O), then ``n``."""
    if body_ms:
        time.sleep(body_ms / 1000)
    return n
