"""RedisStore: each transition is one Lua script, called by SHA (reloaded on NOSCRIPT).

A record is one hash at ``{prefix}:{<key>}``; the braces are a Redis Cluster hash tag, so a
script only ever touches one slot. Lease times come from the server's ``TIME``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import cache, partial
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.commands.core import Script

from idemtask.errors import StoreUnavailable
from idemtask.store.base import Lease, Outcome, Record, State, Status, StoredResult

T = TypeVar("T")

_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)
_OPERATIONS = ("reserve", "cancel", "acquire", "renew", "complete", "release")


@cache
def script_source(name: str) -> str:
    """The prelude followed by the named script, as sent to the server."""
    lua = resources.files("idemtask.store") / "lua"
    return (lua / "_prelude.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class RedisStore:
    """The production store. Give it a ``redis.Redis`` (or cluster) client or a URL."""

    def __init__(self, client: redis.Redis | Any, *, prefix: str = "idemtask") -> None:
        self.client = client
        self.prefix = prefix
        self._scripts: dict[str, Script] = {
            name: client.register_script(script_source(name)) for name in _OPERATIONS
        }

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "idemtask", **client_options: Any) -> RedisStore:
        options: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
        options.update(client_options)
        return cls(redis.Redis.from_url(url, **options), prefix=prefix)

    def record_name(self, key: str) -> str:
        return f"{self.prefix}:{{{key}}}"

    def _call(self, name: str, key: str, *args: Any) -> Any:
        return _guarded(lambda: self._scripts[name](keys=[self.record_name(key)], args=args))

    # -- transitions ---------------------------------------------------------------------

    def reserve(
        self,
        key: str,
        *,
        task_id: str,
        task_name: str,
        fingerprint: str,
        reservation_ms: int,
        ttl_ms: int,
    ) -> Outcome:
        reply = self._call("reserve", key, task_id, task_name, fingerprint, reservation_ms, ttl_ms)
        status = Status(_text(reply[0]))
        if status is Status.DUPLICATE:
            return Outcome(
                status,
                task_id=_text(reply[1]),
                state=State(_text(reply[2])),
                result=_result(reply[3], reply[4]),
            )
        return Outcome(status, task_id=_text(reply[1]))

    def cancel(self, key: str, *, task_id: str) -> Outcome:
        reply = self._call("cancel", key, task_id)
        return Outcome(Status(_text(reply[0])), task_id=_text(reply[1]))

    def acquire(
        self,
        key: str,
        *,
        task_id: str,
        attempt_id: str,
        task_name: str,
        fingerprint: str,
        lease_ms: int,
        max_deliveries: int,
        ttl_ms: int,
    ) -> Outcome:
        reply = self._call(
            "acquire",
            key,
            task_id,
            attempt_id,
            task_name,
            fingerprint,
            lease_ms,
            max_deliveries,
            ttl_ms,
        )
        status = Status(_text(reply[0]))
        task = _text(reply[1])
        if status is Status.ACQUIRED:
            return Outcome(
                status,
                task_id=task,
                state=State.RUNNING,
                token=int(reply[2]),
                takeover=bool(int(reply[3])),
                deliveries=int(reply[4]),
            )
        if status is Status.BUSY:
            return Outcome(status, task_id=task, state=State.RUNNING, lease_left_ms=int(reply[2]))
        if status is Status.DONE:
            return Outcome(
                status, task_id=task, state=State.DONE, result=_result(reply[2], reply[3])
            )
        if status is Status.FAILED:
            return Outcome(status, task_id=task, state=State.FAILED, error=_text(reply[2]))
        if status is Status.POISONED:
            return Outcome(
                status,
                task_id=task,
                state=State.FAILED,
                deliveries=int(reply[2]),
                error=_text(reply[3]),
            )
        return Outcome(status, task_id=task)

    def renew(self, lease: Lease) -> bool:
        return self.renew_many([lease])[0]

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        if not leases:
            return []
        script = self._scripts["renew"]

        def send() -> list[Any]:
            # EVALSHA directly: a pipeline of Script objects would first send SCRIPT EXISTS,
            # a second round trip on every renewal.
            pipe = self.client.pipeline(transaction=False)
            for lease in leases:
                pipe.evalsha(
                    script.sha,
                    1,
                    self.record_name(lease.key),
                    lease.attempt_id,
                    lease.token,
                    lease.lease_ms,
                )
            answers = list(pipe.execute(raise_on_error=False))
            if any(isinstance(a, redis.exceptions.NoScriptError) for a in answers):
                self.client.script_load(script.script)
                return send()
            for answer in answers:
                if isinstance(answer, Exception):
                    raise answer
            return answers

        return [bool(int(answer)) for answer in _guarded(send)]

    def complete(
        self,
        key: str,
        *,
        attempt_id: str,
        token: int,
        result: bytes | None,
        result_ttl_ms: int,
    ) -> Outcome:
        has_result = "0" if result is None else "1"
        reply = self._call(
            "complete", key, attempt_id, token, has_result, result or b"", result_ttl_ms
        )
        status = Status(_text(reply[0]))
        if status is Status.COMPLETED:
            return Outcome(status, task_id=_text(reply[1]), state=State.DONE)
        return Outcome(
            status,
            task_id=_text(reply[1]),
            state=_state(reply[2]),
            result=_result(reply[3], reply[4]),
        )

    def release(
        self,
        key: str,
        *,
        attempt_id: str,
        token: int,
        error: str,
        terminal: bool,
        ttl_ms: int,
    ) -> Outcome:
        reply = self._call(
            "release", key, attempt_id, token, error, "1" if terminal else "0", ttl_ms
        )
        status = Status(_text(reply[0]))
        if status is Status.RELEASED:
            state = State.FAILED if terminal else State.IDLE
            return Outcome(status, task_id=_text(reply[1]), state=state)
        return Outcome(status, task_id=_text(reply[1]), state=_state(reply[2]))

    # -- admin ---------------------------------------------------------------------------

    def inspect(self, key: str) -> Record | None:
        name = self.record_name(key)

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(name)
            pipe.pttl(name)
            return list(pipe.execute())

        fields, ttl = _guarded(read)
        return _record(key, fields, int(ttl)) if fields else None

    def forget(self, key: str) -> bool:
        return bool(_guarded(lambda: self.client.delete(self.record_name(key))))

    def scan(self, *, batch: int = 500) -> Iterator[Record]:
        match = f"{self.prefix}:{{*}}"
        cursor: Any = 0
        start = len(self.prefix) + 2
        while True:
            page: tuple[Any, list[Any]] = _guarded(
                partial(self.client.scan, cursor=cursor, match=match, count=batch)
            )
            cursor, names = page
            for name in names:
                key = _text(name)[start:-1]
                record = self.inspect(key)
                if record is not None:
                    yield record
            if int(cursor) == 0:
                return

    def ping(self) -> None:
        _guarded(self.client.ping)


def _guarded(op: Callable[[], T]) -> T:
    try:
        return op()
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"idempotency store unreachable: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _state(value: Any) -> State | None:
    text = _text(value)
    return State(text) if text else None


def _result(flag: Any, data: Any) -> StoredResult | None:
    if _text(flag) != "1":
        return None
    return StoredResult(data if isinstance(data, bytes) else _text(data).encode())


def _record(key: str, raw: dict[Any, Any], ttl_ms: int) -> Record:
    fields = {_text(k): v for k, v in raw.items()}

    def text(name: str) -> str:
        return _text(fields.get(name, b""))

    def number(name: str) -> int:
        return int(text(name) or 0)

    return Record(
        key=key,
        state=State(text("s")),
        task_id=text("t"),
        task_name=text("n"),
        holder=text("h"),
        token=number("k"),
        lease_until_ms=number("l"),
        fingerprint=text("f"),
        deliveries=number("d"),
        result=_result(fields.get("x", b"0"), fields.get("r", b"")),
        error=text("e"),
        created_ms=number("c"),
        updated_ms=number("u"),
        ttl_ms=ttl_ms,
    )
