"""Misspelt idemtask options on Dramatiq actors.

Dramatiq's ``actor()`` decorator refuses every option no middleware declares, with a
``ValueError`` naming it, before any middleware hook runs. An actor made otherwise
(``dramatiq.Actor(...)`` directly, or declared before the middleware was added) reaches
idemtask with its options unchecked: a misspelt one must not be ignored there either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dramatiq
from dramatiq.broker import Broker

from idemtask.errors import ConfigurationError
from idemtask.policy import check_option_names

from .errors import InvalidActorOptions


def check_actor_options(
    broker: Broker, actor: dramatiq.Actor[Any, Any], spellings: Mapping[str, str]
) -> None:
    """Refuse options of ``actor`` that no middleware of ``broker`` declares and that look
    like an idemtask option (``spellings``: actor option name -> policy option).

    Options another middleware declares are its own (Results' ``result_ttl``), never taken
    for misspellings.
    """
    undeclared = set(actor.options) - set(broker.actor_options)
    try:
        check_option_names(undeclared, source=f"actor {actor.actor_name}", spellings=spellings)
    except ConfigurationError as exc:
        raise InvalidActorOptions(str(exc)) from None
