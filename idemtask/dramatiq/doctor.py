"""``check_broker(broker)``: the invariants the Dramatiq adapter relies on, read from the broker
a worker will actually use. Every check reports, OK included, so a clean run shows what was
checked."""

from __future__ import annotations

import math
from typing import Any

from dramatiq.broker import Broker
from dramatiq.middleware import Retries, TimeLimit
from dramatiq.results import Results

from idemtask.doctor import check_store
from idemtask.errors import ConfigurationError
from idemtask.findings import Finding, Level
from idemtask.policy import Policy

from .middleware import ACTOR_OPTIONS, IdempotencyMiddleware
from .options import check_actor_options

_MEMORY_BROKERS = {"StubBroker"}


def check_broker(broker: Broker) -> list[Finding]:
    """Check ``broker``'s middleware stack, its idempotent actors and the store behind them."""
    findings: list[Finding] = []
    stack = list(broker.middleware)
    ours = [m for m in stack if isinstance(m, IdempotencyMiddleware)]
    if not ours:
        missing = Finding(
            Level.ERROR,
            "dramatiq.middleware",
            "IdempotencyMiddleware is not registered on this broker; no actor is guarded",
            "broker.add_middleware(IdempotencyMiddleware(...), before=Retries) before "
            "declaring actors",
        )
        unguarded = _unguarded(broker, None)
        return [missing] + ([unguarded] if unguarded.level is not Level.OK else [])
    middleware = ours[0]
    findings.append(_order(stack, middleware))
    findings.append(_actor_options(broker))
    findings.append(_unguarded(broker, middleware))
    policies = {
        name: policy
        for name in broker.actors
        if (policy := middleware.policy_for(name)) is not None
    }
    findings.append(
        Finding(Level.OK, "dramatiq.actors", f"{len(policies)} idempotent actor(s)")
        if policies
        else Finding(
            Level.WARNING,
            "dramatiq.actors",
            "no actor is declared idempotent",
            "declare actors with idempotent=True (after adding the middleware), or "
            "IdempotencyMiddleware(default_idempotent=True)",
        )
    )
    findings.append(_results(broker, stack, policies))
    findings.extend(_time_limits(broker, stack, policies))
    findings.append(_heartbeat(broker, policies))
    findings.extend(_store(broker, middleware))
    return findings


def _order(stack: list[Any], middleware: IdempotencyMiddleware) -> Finding:
    retries = [i for i, m in enumerate(stack) if isinstance(m, Retries)]
    here = stack.index(middleware)
    if retries and here > retries[0]:
        return Finding(
            Level.ERROR,
            "dramatiq.middleware_order",
            "IdempotencyMiddleware comes after Retries",
            "add it with before=Retries, so a deferred delivery is set aside before Retries "
            "could count it",
        )
    where = "before Retries" if retries else "(no Retries middleware)"
    return Finding(Level.OK, "dramatiq.middleware_order", f"IdempotencyMiddleware is {where}")


def _unguarded(broker: Broker, middleware: IdempotencyMiddleware | None) -> Finding:
    """Actors whose idemtask options nothing reads: the broker has no IdempotencyMiddleware,
    or the actor sets options without ``idempotent=True`` (and the middleware's default is
    not idempotent). An explicit ``idempotent=False`` is a choice, not a slip."""
    unguarded: list[str] = []
    for name in sorted(broker.actors):
        options = broker.actors[name].options
        ours = sorted(set(options) & set(ACTOR_OPTIONS))
        if not ours:
            continue
        if middleware is None or (
            "idempotent" not in options and middleware.policy_for(name) is None
        ):
            unguarded.append(f"{name} ({', '.join(ours)})")
    if not unguarded:
        return Finding(
            Level.OK, "dramatiq.unguarded", "every actor with idemtask options is guarded"
        )
    if middleware is None:
        why = "the broker has no IdempotencyMiddleware"
        fix = "broker.add_middleware(IdempotencyMiddleware(...), before=Retries)"
    else:
        why = "they are not declared idempotent=True"
        fix = "idempotent=True on those actors, or IdempotencyMiddleware(default_idempotent=True)"
    return Finding(
        Level.ERROR,
        "dramatiq.unguarded",
        f"these actors set idemtask options but {why}, so nothing guards them: "
        + ", ".join(unguarded),
        fix,
    )


def _actor_options(broker: Broker) -> Finding:
    """A misspelt option on an actor made without the decorator would be ignored."""
    problems: list[str] = []
    for name in sorted(broker.actors):
        try:
            check_actor_options(broker, broker.actors[name], ACTOR_OPTIONS)
        except ConfigurationError as err:
            problems.append(str(err))
    if problems:
        return Finding(
            Level.ERROR, "dramatiq.actor_options", "; ".join(problems), "fix the actor options"
        )
    return Finding(
        Level.OK, "dramatiq.actor_options", f"options of {len(broker.actors)} actor(s) valid"
    )


def _results(broker: Broker, stack: list[Any], policies: dict[str, Policy]) -> Finding:
    results = next((m for m in stack if isinstance(m, Results)), None)
    if results is None:
        return Finding(
            Level.WARNING,
            "dramatiq.results",
            "no Results middleware: a duplicate send() returns the original message, but "
            "get_result() on it has nothing to read",
            "add Results(backend=...) and store_results=True on actors whose callers read results",
        )
    storing = [
        name
        for name in policies
        if broker.actors[name].options.get("store_results", results.store_results)
    ]
    return Finding(
        Level.OK,
        "dramatiq.results",
        f"Results present; {len(storing)} idempotent actor(s) store results",
    )


def _time_limits(broker: Broker, stack: list[Any], policies: dict[str, Policy]) -> list[Finding]:
    limit_mw = next((m for m in stack if isinstance(m, TimeLimit)), None)
    if limit_mw is None:
        return [
            Finding(
                Level.WARNING,
                "dramatiq.time_limit",
                "no TimeLimit middleware: a hung body renews its lease for ever and every "
                "other delivery of its key is deferred meanwhile",
                "keep TimeLimit with a finite time_limit (presets.at_least_once)",
            )
        ]
    findings: list[Finding] = []
    for name, policy in policies.items():
        limit = broker.actors[name].options.get("time_limit", limit_mw.time_limit)
        if limit is None or not math.isfinite(limit):
            findings.append(
                Finding(
                    Level.WARNING,
                    "dramatiq.time_limit",
                    f"actor {name} has no time limit: a hung body holds its key for ever",
                    "set a finite time_limit",
                )
            )
        elif policy.on_running == "wait" and limit <= policy.wait_timeout * 1000:
            findings.append(
                Finding(
                    Level.ERROR,
                    "dramatiq.time_limit",
                    f"actor {name}: time_limit {limit} ms <= wait_timeout "
                    f"{policy.wait_timeout} s with on_running='wait'",
                    "the wait happens inside the time limit: raise time_limit or lower "
                    "wait_timeout",
                )
            )
    if not findings:
        findings.append(
            Finding(
                Level.OK,
                "dramatiq.time_limit",
                f"time limits are finite (default {limit_mw.time_limit} ms)",
            )
        )
    return findings


def _heartbeat(broker: Broker, policies: dict[str, Policy]) -> Finding:
    heartbeat = getattr(broker, "heartbeat_timeout", None)
    if heartbeat is None:
        return Finding(
            Level.OK,
            "dramatiq.heartbeat_timeout",
            f"{type(broker).__name__} redelivers on connection loss (no heartbeat timeout); "
            "for RabbitMQ, keep the server's consumer_timeout above the longest run "
            "(presets.at_least_once(...).rabbitmq_conf)",
        )
    longest = max((p.lease_ms for p in policies.values()), default=0)
    if heartbeat < longest:
        return Finding(
            Level.WARNING,
            "dramatiq.heartbeat_timeout",
            f"RedisBroker heartbeat_timeout {heartbeat} ms < lease {longest} ms: a crashed "
            "worker's messages come back while its lease still runs and are deferred once more",
            "heartbeat_timeout = lease + a few seconds (presets.at_least_once(...).redis_broker)",
        )
    return Finding(
        Level.OK,
        "dramatiq.heartbeat_timeout",
        f"RedisBroker heartbeat_timeout {heartbeat} ms >= lease {longest} ms",
    )


def _store(broker: Broker, middleware: IdempotencyMiddleware) -> list[Finding]:
    in_process = type(broker).__name__ in _MEMORY_BROKERS
    return check_store(middleware.settings, in_process_broker=in_process)
