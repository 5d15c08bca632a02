"""Errors that must escape Dramatiq's hooks.

``Broker.emit_before`` logs and swallows every exception that is not a ``MiddlewareError``,
so each error idemtask raises from a hook is also a ``MiddlewareError``; users catch it by
its idemtask type (``KeyDerivationError``, ``ConfigurationError``).
"""

from __future__ import annotations

from dramatiq.middleware import MiddlewareError

from idemtask.errors import ConfigurationError, KeyDerivationError


class UnkeyableMessage(KeyDerivationError, MiddlewareError):
    """The message's arguments give no stable key, so it is refused before it is enqueued."""


class InvalidActorOptions(ConfigurationError, MiddlewareError):
    """An actor's idemtask options are invalid; raised when the actor is declared."""
