"""What counts as the store failing: decided here, once, for every call RedisStore makes.

The line: an exception raised by the Redis client while it talks to the server is a store
failure, whatever its type, and becomes a ``StoreUnavailable`` the guard acts on:

* an error reply (``ResponseError`` and its subclasses, authentication replies, ``LOADING``)
  is a ``StoreRefused`` whose ``reason`` is the reply's first word: ``OOM``, ``MISCONF``,
  ``BUSY``, ``NOPERM``, ``READONLY``, ``WRONGTYPE``, ``NOSCRIPT``, ``ERR`` (a script error)...
* no usable answer (refused or reset connection, timeout, a cluster without a covering node,
  a server that does not speak the Redis protocol, an ``OSError`` from the socket layer) is
  a ``StoreUnreachable``;
* any other ``RedisError`` (e.g. ``DataError``: the client would not encode a value) is a
  plain ``StoreUnavailable``: the call did not happen, and keeping the message is the side
  that loses nothing.

Exceptions that do not come from the client (``TypeError``, ``ValueError``, ``KeyError``
raised by idemtask's own code, including the decoding of a reply) are bugs, not store
failures: they propagate unchanged so that they are seen rather than retried forever.

A message says what the store answered, never a secret: the client's password and any
``user:password@`` in a URL are masked, and an original exception whose text had to be
masked is not chained (its traceback would print the secret).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis

from idemtask.errors import StoreRefused, StoreUnavailable, StoreUnreachable

T = TypeVar("T")

#: Error replies redis-py turns into their own class, stripping the first word.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (redis.exceptions.OutOfMemoryError, "OOM"),
    (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.BusyLoadingError, "LOADING"),
    (redis.exceptions.NoPermissionError, "NOPERM"),
    (redis.exceptions.NoScriptError, "NOSCRIPT"),
    (redis.exceptions.ExecAbortError, "EXECABORT"),
    (redis.exceptions.MasterDownError, "MASTERDOWN"),
    (redis.exceptions.ClusterDownError, "CLUSTERDOWN"),
    (redis.exceptions.TryAgainError, "TRYAGAIN"),
    (redis.exceptions.MovedError, "MOVED"),
    (redis.exceptions.AskError, "ASK"),
    (redis.exceptions.ClusterCrossSlotError, "CROSSSLOT"),
    (redis.exceptions.AuthenticationError, "WRONGPASS"),
    (redis.exceptions.AuthorizationError, "NOPERM"),
)
_REPLIES: tuple[type[Exception], ...] = (
    redis.exceptions.ResponseError,
    redis.exceptions.AuthenticationError,
    redis.exceptions.AuthorizationError,
    redis.exceptions.BusyLoadingError,
)
_UNREACHABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.InvalidResponse,
    redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,
    OSError,
)
#: Everything a client call can raise that is the store's doing, not idemtask's.
FAILURES: tuple[type[Exception], ...] = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
)
#: Failures after which a cluster client should read the slot table again: the node may
#: have failed over or the slot moved. An error reply such as OOM is no reason to.
TOPOLOGY: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.AskError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.RedisClusterException,
)
_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ", re.DOTALL)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_WORD = re.compile(r"[A-Z][A-Z_-]+")
_MASK = "***"


def guarded(op: Callable[[], T], secrets: Iterable[str] = ()) -> T:
    """Run one client call; a store failure comes out as a ``StoreUnavailable``."""
    try:
        return op()
    except FAILURES as exc:
        failure = classify(exc, secrets)
        if mask(str(exc), secrets) != str(exc):
            raise failure from None  # the original's traceback would print the secret
        raise failure from exc


def classify(exc: BaseException, secrets: Iterable[str] = ()) -> StoreUnavailable:
    """The ``StoreUnavailable`` for a client exception (see the module docstring)."""
    if isinstance(exc, StoreUnavailable):
        return exc
    raw = _PIPELINE_PREFIX.sub("", str(exc))
    detail = mask(raw, secrets)
    failure: StoreUnavailable
    if isinstance(exc, _REPLIES) or getattr(exc, "status_code", None):
        reason = reply_reason(exc, raw)
        text = detail if detail.startswith(reason) else f"{reason} {detail}".rstrip()
        failure = StoreRefused(f"idempotency store refused the command: {text}", reason)
    elif isinstance(exc, redis.exceptions.InvalidResponse):
        failure = StoreUnreachable(
            f"idempotency store unreachable: the server does not speak the Redis protocol "
            f"({detail})"
        )
    elif isinstance(exc, _UNREACHABLE):
        failure = StoreUnreachable(f"idempotency store unreachable: {_describe(exc, detail)}")
    else:
        failure = StoreUnavailable(f"idempotency store call failed: {_describe(exc, detail)}")
    return failure


def reply_reason(exc: BaseException, text: str) -> str:
    """The error reply's first word (redis-py strips it from the text of some classes)."""
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    for cls, reason in _REASONS:
        if isinstance(exc, cls):
            return reason
    first = text.split(" ", 1)[0]
    return first if _WORD.fullmatch(first) else "ERR"


def mask(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret and every URL's ``user:password@`` replaced by ``***``."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{_MASK}@", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, _MASK)
    return text


def client_secrets(client: Any) -> tuple[str, ...]:
    """The passwords a redis-py client (single, cluster or sentinel-backed) was given."""
    pool = getattr(client, "connection_pool", None)
    sentinels = getattr(getattr(pool, "sentinel_manager", None), "sentinels", [])
    sources = [
        getattr(pool, "connection_kwargs", None),
        getattr(getattr(client, "nodes_manager", None), "connection_kwargs", None),
        *(getattr(s.connection_pool, "connection_kwargs", None) for s in sentinels),
    ]
    found: list[str] = []
    for kwargs in sources:
        if isinstance(kwargs, dict):
            password = kwargs.get("password")
            if isinstance(password, str) and password:
                found.append(password)
    return tuple(found)


def _describe(exc: BaseException, detail: str) -> str:
    return detail or type(exc).__name__
