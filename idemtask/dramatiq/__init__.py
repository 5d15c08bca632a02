"""Dramatiq adapter: ``IdempotencyMiddleware``, broker ``presets`` and ``check_broker``."""

from __future__ import annotations

from . import presets
from .doctor import check_broker
from .errors import InvalidActorOptions, UnkeyableMessage
from .middleware import IdempotencyMiddleware

__all__ = [
    "IdempotencyMiddleware",
    "InvalidActorOptions",
    "UnkeyableMessage",
    "check_broker",
    "presets",
]
