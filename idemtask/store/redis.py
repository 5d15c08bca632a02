"""RedisStore: each transition is one Lua script, called by SHA (reloaded on NOSCRIPT).

A record is one hash at ``{prefix}:{<key>}``; the braces are a Redis Cluster hash tag, so a
script only ever touches one slot. Lease times come from the server's ``TIME``.

The same store runs on a single server, on Redis Cluster (give it a ``RedisCluster`` or a
``redis+cluster://`` URL) and behind Sentinel (a ``redis+sentinel://`` URL); see
``docs/scaling.md``. A failover can lose writes the old primary had not yet replicated;
``wait_replicas`` makes ``complete`` wait for replicas and warn when they do not confirm.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import cache, partial
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from idemtask.store.base import (
    AcquireAnswer,
    Acquired,
    Busy,
    CancelAnswer,
    CompleteAnswer,
    Completed,
    Conflict,
    Done,
    Duplicate,
    Failed,
    Held,
    Lease,
    New,
    Poisoned,
    Record,
    Recorded,
    ReleaseAnswer,
    Released,
    ReserveAnswer,
    Stale,
    State,
    Status,
    StepAnswer,
    StepsAnswer,
    StoredResult,
)
from idemtask.store.cluster import cluster_client, is_cluster_url, is_sentinel_url, sentinel_client
from idemtask.store.failures import FAILURES, TOPOLOGY, classify, client_secrets, guarded
from idemtask.store.wire import ScriptCaller, supports

T = TypeVar("T")

_OPERATIONS = ("reserve", "cancel", "acquire", "renew", "complete", "release", "step", "steps")
_REDIRECT_RETRIES = 3

logger = logging.getLogger("idemtask.store")


@cache
def script_source(name: str) -> str:
    """The prelude followed by the named script, as sent to the server."""
    lua = resources.files("idemtask.store") / "lua"
    return (lua / "_prelude.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class RedisStore:
    """The production store. Give it a ``redis.Redis``, a ``RedisCluster`` or a URL.

    ``wait_replicas=N`` sends ``WAIT N wait_timeout_ms`` right after a successful
    ``complete`` on the same connection (same round trip): the completion is then on N
    replicas and survives a failover to one of them. When fewer replicas confirm in time the
    completion is still COMPLETED (it is recorded on the primary, and the task's side effects
    already happened: raising would only make the caller retry a finished task); the store
    logs a warning and counts it in ``wait_shortfalls``.

    On a single server or Sentinel's primary, the one-key scripts go over a connection of
    the calling thread's own (``idemtask.store.wire``); ``lean_calls=False`` sends them
    through redis-py's command path instead (what the benchmark compares it with).
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster | Any,
        *,
        prefix: str = "idemtask",
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        lean_calls: bool = True,
    ) -> None:
        if wait_replicas < 0 or wait_timeout_ms < 1:
            # WAIT n 0 would block until the replicas answer, however long that takes.
            raise ValueError("wait_replicas must be >= 0 and wait_timeout_ms >= 1")
        self.prefix = prefix
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.wait_shortfalls = 0  # completions fewer replicas confirmed than asked
        self._lock = threading.Lock()
        self._connect: Callable[[], RedisCluster] | None = None
        self._client: Any = None
        self._scripts: dict[str, Script] = {}
        self._secrets: tuple[str, ...] = ()
        self._lean_calls = lean_calls
        self._caller: ScriptCaller | None = None
        self.is_cluster = isinstance(client, RedisCluster)
        if client is not None:
            self._use(client)

    def _use(self, client: Any) -> None:
        self._secrets = client_secrets(client)  # masked in every error message
        self._scripts = {name: client.register_script(script_source(name)) for name in _OPERATIONS}
        if self._lean_calls and supports(client):
            self._caller = ScriptCaller(client)
        self._client = client

    @property
    def client(self) -> Any:
        """The redis-py client. A cluster none of whose seed nodes answered when the store
        was built is connected here, on first use; until then this raises StoreUnavailable."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None and self._connect is not None:
                    self._use(self._guarded(self._connect))
                client = self._client
        return client

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "idemtask",
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        lean_calls: bool = True,
        **client_options: Any,
    ) -> RedisStore:
        """Build the client the URL names: ``redis://``, ``rediss://``, ``unix://``,
        ``redis+cluster://`` / ``rediss+cluster://`` (seed nodes) or ``redis+sentinel://``.

        A cluster client reads the slot table when it is made; if no seed node answers, the
        store is still made and connects on first use (each call until then fails with
        ``StoreUnreachable``, which the guard handles like any outage)."""
        options: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
        options.update(client_options)
        settings: dict[str, Any] = {
            "prefix": prefix,
            "wait_replicas": wait_replicas,
            "wait_timeout_ms": wait_timeout_ms,
            "lean_calls": lean_calls,
        }
        if is_cluster_url(url):
            return cls._cluster(partial(cluster_client, url, **options), settings)
        if is_sentinel_url(url):
            return cls(sentinel_client(url, **options), **settings)
        return cls(redis.Redis.from_url(url, **options), **settings)

    @classmethod
    def _cluster(cls, connect: Callable[[], RedisCluster], settings: dict[str, Any]) -> RedisStore:
        try:
            return cls(connect(), **settings)
        except FAILURES as exc:
            logger.warning("idemtask store: %s; connecting on first use", classify(exc))
        store = cls(None, **settings)
        store.is_cluster = True
        store._connect = connect
        return store

    def _script(self, name: str) -> Script:
        if self._client is None:
            self.client  # noqa: B018 - connects, or raises StoreUnavailable
        return self._scripts[name]

    def record_name(self, key: str) -> str:
        return f"{self.prefix}:{{{key}}}"

    def _call(self, name: str, key: str, *args: Any) -> Any:
        caller = self._caller
        if caller is not None:
            script = self._scripts[name]
            record = self.record_name(key)
            return self._guarded(lambda: caller.call(script.sha, script.script, record, args))
        return self._guarded(lambda: self._script(name)(keys=[self.record_name(key)], args=args))

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
    ) -> ReserveAnswer:
        reply = self._call("reserve", key, task_id, task_name, fingerprint, reservation_ms, ttl_ms)
        return _reserve_answer(reply)

    def cancel(self, key: str, *, task_id: str) -> CancelAnswer:
        reply = self._call("cancel", key, task_id)
        return _released_or_stale("cancel", reply)

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
    ) -> AcquireAnswer:
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
        return _acquire_answer(reply)

    def renew(self, lease: Lease) -> bool:
        return self.renew_many([lease])[0]

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        if not leases:
            return []
        if self.is_cluster:
            return self._renew_many_cluster(leases)
        script = self._script("renew")

        def send(reload: bool = True) -> list[Any]:
            # EVALSHA directly: a pipeline of Script objects would first send SCRIPT EXISTS,
            # a second round trip on every renewal.
            pipe = self.client.pipeline(transaction=False)
            for lease in leases:
                pipe.evalsha(*self._renew_args(script, lease))
            answers = list(pipe.execute(raise_on_error=False))
            if reload and any(isinstance(a, redis.exceptions.NoScriptError) for a in answers):
                self.client.script_load(script.script)
                return send(reload=False)  # NOSCRIPT again: raised below, a store failure
            for answer in answers:
                if isinstance(answer, Exception):
                    raise answer
            return answers

        return [bool(int(answer)) for answer in self._guarded(send)]

    def _renew_args(self, script: Script, lease: Lease) -> tuple[Any, ...]:
        name = self.record_name(lease.key)
        return (script.sha, 1, name, lease.attempt_id, lease.token, lease.lease_ms)

    def _renew_many_cluster(self, leases: Sequence[Lease]) -> list[bool]:
        """Group the leases by the node that serves their slot (the client's slot table, no
        round trip) and pipeline each group to its node: one round trip per node.

        redis-py's cluster pipeline is not used: for EVALSHA it asks a node for the keys
        of every command (COMMAND GETKEYS) before sending, one extra round trip each.
        """
        script = self._script("renew")
        cluster: Any = self.client
        answers: dict[int, bool] = {}

        def answers_pending() -> list[int]:
            return [i for i in range(len(leases)) if i not in answers]

        def send(pending: list[int], attempts: int) -> None:
            groups: dict[str, tuple[Any, list[int]]] = {}
            for i in pending:
                node = cluster.get_node_from_key(self.record_name(leases[i].key))
                groups.setdefault(node.name, (node, []))[1].append(i)
            redirected: list[int] = []
            for node, indexes in groups.values():
                target = cluster.get_redis_connection(node)
                replies = self._pipeline_node(target, script, [leases[i] for i in indexes])
                for i, reply in zip(indexes, replies, strict=True):
                    if isinstance(reply, redis.exceptions.AskError):  # MOVED or ASK
                        redirected.append(i)
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        answers[i] = bool(int(reply))
            if redirected:
                if attempts <= 0:
                    raise redis.exceptions.TryAgainError("slots kept moving during renew_many")
                self._refresh_topology()
                send(redirected, attempts - 1)

        def run() -> None:  # a retry after a connection error sends only what is left
            send(answers_pending(), _REDIRECT_RETRIES)

        self._guarded(partial(self._on_cluster_nodes, run))
        return [answers[i] for i in range(len(leases))]

    def _pipeline_node(
        self, target: Any, script: Script, leases: Sequence[Lease], reload: bool = True
    ) -> list[Any]:
        pipe = target.pipeline(transaction=False)
        for lease in leases:
            pipe.evalsha(*self._renew_args(script, lease))
        replies = list(pipe.execute(raise_on_error=False))
        if reload and any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
            target.script_load(script.script)  # this node lost its scripts (restart, failover)
            return self._pipeline_node(target, script, leases, reload=False)
        return replies

    def complete(
        self,
        key: str,
        *,
        attempt_id: str,
        token: int,
        result: bytes | None,
        result_ttl_ms: int,
    ) -> CompleteAnswer:
        has_result = "0" if result is None else "1"
        args = (attempt_id, token, has_result, result or b"", result_ttl_ms)
        if self.wait_replicas:
            return self._complete_and_wait(key, args)
        return _complete_answer(self._call("complete", key, *args))

    def release(
        self,
        key: str,
        *,
        attempt_id: str,
        token: int,
        error: str,
        terminal: bool,
        ttl_ms: int,
    ) -> ReleaseAnswer:
        reply = self._call(
            "release", key, attempt_id, token, error, "1" if terminal else "0", ttl_ms
        )
        return _released_or_stale("release", reply)

    def _complete_and_wait(self, key: str, args: tuple[Any, ...]) -> CompleteAnswer:
        """EVALSHA complete + WAIT pipelined on one connection to the key's primary.

        WAIT counts replicas that acknowledged this connection's last write, so it must go
        on the connection that ran the script; the pipeline keeps it one round trip.
        """
        name = self.record_name(key)
        script = self._script("complete")

        def send(attempts: int = _REDIRECT_RETRIES, reload: bool = True) -> tuple[Any, int]:
            target = self._primary_client(name)
            pipe = target.pipeline(transaction=False)
            pipe.evalsha(script.sha, 1, name, *args)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            reply, acked = pipe.execute(raise_on_error=False)
            if reload and isinstance(reply, redis.exceptions.NoScriptError):
                # Nothing was written, so that WAIT had nothing new to wait for (it returns
                # at once unless the replicas are behind on older writes).
                target.script_load(script.script)
                return send(attempts, reload=False)
            if isinstance(reply, redis.exceptions.AskError) and attempts > 0:
                # MOVED (a failover promoted another node) or ASK: find the owner again.
                self._refresh_topology()
                return send(attempts - 1)
            for answer in (reply, acked):
                if isinstance(answer, Exception):
                    raise answer
            return reply, int(acked)

        reply, acked = self._guarded(partial(self._on_cluster_nodes, send))
        answer = _complete_answer(reply)
        if isinstance(answer, Completed) and acked < self.wait_replicas:
            with self._lock:
                self.wait_shortfalls += 1
            logger.warning(
                "completion of %s confirmed by %d of %d replica(s) within %d ms: a failover "
                "now could lose it",
                name,
                acked,
                self.wait_replicas,
                self.wait_timeout_ms,
            )
        return answer

    def _primary_client(self, name: str) -> Any:
        """A client bound to the node that serves ``name`` (the client itself off-cluster)."""
        if not self.is_cluster:
            return self.client
        cluster: Any = self.client
        return cluster.get_redis_connection(cluster.get_node_from_key(name))

    def _on_cluster_nodes(self, op: Callable[[], T]) -> T:
        """Run ``op``, which talks to cluster nodes directly. A node that cannot be reached
        may be a primary that failed over: read the slot table again and try once more (as
        redis-py does for single commands), then give up. A completion retried after its
        reply was lost answers STALE with the recorded result, which the guard replays."""
        if not self.is_cluster:
            return op()
        try:
            return op()
        except redis.exceptions.ConnectionError:
            self._refresh_topology()
        try:
            return op()
        except TOPOLOGY:
            self._refresh_topology()
            raise

    def _refresh_topology(self) -> None:
        if self.is_cluster:
            cluster: Any = self.client
            # If this fails too, the next call tries again.
            with contextlib.suppress(
                redis.exceptions.RedisError, redis.exceptions.RedisClusterException
            ):
                cluster.nodes_manager.initialize()

    # -- admin ---------------------------------------------------------------------------

    def inspect(self, key: str) -> Record | None:
        name = self.record_name(key)

        def read() -> list[Any]:
            # One slot, so one node and one round trip either way; MULTI is not portable
            # across the redis-py versions' cluster pipelines, and this is an admin read.
            pipe = self.client.pipeline(transaction=not self.is_cluster)
            pipe.hgetall(name)
            pipe.pttl(name)
            return list(pipe.execute())

        fields, ttl = self._guarded(read)
        return _record(key, fields, int(ttl)) if fields else None

    def forget(self, key: str) -> bool:
        return bool(self._guarded(lambda: self.client.delete(self.record_name(key))))

    def scan(self, *, batch: int = 500) -> Iterator[Record]:
        """Every record: SCAN on the server, or on every primary of a cluster in turn."""
        if not self.is_cluster:
            yield from self._scan_node(self.client, batch)
            return
        cluster: Any = self.client
        for node in self._guarded(cluster.get_primaries):
            yield from self._scan_node(cluster.get_redis_connection(node), batch)

    def _scan_node(self, client: Any, batch: int) -> Iterator[Record]:
        match = f"{self.prefix}:{{*}}"
        cursor: Any = 0
        start = len(self.prefix) + 2
        while True:
            page: tuple[Any, list[Any]] = self._guarded(
                partial(client.scan, cursor=cursor, match=match, count=batch)
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
        self._guarded(lambda: self.client.ping())

    def _guarded(self, op: Callable[[], T]) -> T:
        """Every client call goes through here: a failure of the store, whatever the client
        raised, comes out as a ``StoreUnavailable`` (see ``idemtask.store.failures``)."""
        return guarded(op, self._secrets)

    # -- steps (idemtask.step) -----------------------------------------------------------

    def record_step(
        self, key: str, *, attempt_id: str, token: int, name: str, value: bytes
    ) -> StepAnswer:
        reply = self._call("step", key, attempt_id, token, name, value)
        return _step_answer(reply)

    def recorded_steps(self, key: str, *, attempt_id: str, token: int) -> StepsAnswer:
        reply = self._call("steps", key, attempt_id, token)
        return _steps_answer(reply)


# -- replies into answers (SCRIPT_REPLIES in base.py) -------------------------------------


def _reserve_answer(reply: Any) -> ReserveAnswer:
    task = _text(reply[1])
    match _status(reply):
        case Status.NEW:
            return New(task)
        case Status.DUPLICATE:
            return Duplicate(task, State(_text(reply[2])), _result(reply[3], reply[4]))
        case Status.CONFLICT:
            return Conflict(task)
    raise _unexpected("reserve", reply)


def _acquire_answer(reply: Any) -> AcquireAnswer:
    task = _text(reply[1])
    match _status(reply):
        case Status.ACQUIRED:
            return Acquired(task, int(reply[2]), bool(int(reply[3])), int(reply[4]))
        case Status.BUSY:
            return Busy(task, int(reply[2]))
        case Status.DONE:
            return Done(task, _result(reply[2], reply[3]))
        case Status.FAILED:
            return Failed(task, _text(reply[2]))
        case Status.POISONED:
            return Poisoned(task, int(reply[2]), _text(reply[3]))
        case Status.CONFLICT:
            return Conflict(task)
    raise _unexpected("acquire", reply)


def _complete_answer(reply: Any) -> CompleteAnswer:
    match _status(reply):
        case Status.COMPLETED:
            return Completed(_text(reply[1]))
        case Status.STALE:
            return Stale(_text(reply[1]), _state(reply[2]), _result(reply[3], reply[4]))
    raise _unexpected("complete", reply)


def _released_or_stale(script: str, reply: Any) -> Released | Stale:
    """cancel and release: ``Released``, or ``Stale`` with the record's state."""
    match _status(reply):
        case Status.RELEASED:
            return Released(_text(reply[1]))
        case Status.STALE:
            return _stale(reply)
    raise _unexpected(script, reply)


def _step_answer(reply: Any) -> StepAnswer:
    match _status(reply):
        case Status.RECORDED:
            return Recorded(_text(reply[1]))
        case Status.STALE:
            return _stale(reply)
    raise _unexpected("step", reply)


def _steps_answer(reply: Any) -> StepsAnswer:
    match _status(reply):
        case Status.HELD:
            pairs = reply[2:]
            steps = {_text(pairs[i]): _bytes(pairs[i + 1]) for i in range(0, len(pairs), 2)}
            return Held(_text(reply[1]), steps)
        case Status.STALE:
            return _stale(reply)
    raise _unexpected("steps", reply)


def _status(reply: Any) -> Status:
    return Status(_text(reply[0]))


def _stale(reply: Any) -> Stale:
    """``{'stale', task_id or '', state or ''}``: no result comes with it."""
    return Stale(_text(reply[1]), _state(reply[2]))


def _unexpected(script: str, reply: Any) -> ValueError:
    """A reply outside the script's contract: a bug, not a store failure (failures.py)."""
    return ValueError(f"{script}.lua answered {reply!r}, not one of SCRIPT_REPLIES[{script!r}]")


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
        task_id=str(uuid.UUID(bytes=_bytes(fields["T"]))) if "T" in fields else text("t"),
        task_name=text("n"),
        holder=text("h"),
        token=number("k"),
        lease_until_ms=number("l"),
        fingerprint=_bytes(fields["F"]).hex() if "F" in fields else text("f"),
        deliveries=number("d"),
        result=_result(_has_result(fields), fields.get("r", b"")),
        error=text("e"),
        created_ms=number("c"),
        updated_ms=number("u"),
        ttl_ms=ttl_ms,
        steps=_steps(fields),
    )


def _has_result(fields: dict[str, Any]) -> Any:
    """The has-result flag: ``x`` in records finished before the compact layout, else
    whether the record holds a result ``r`` at all (as ``has_result`` in the scripts)."""
    if "x" in fields:
        return fields["x"]
    return "1" if "r" in fields else "0"


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else _text(value).encode()


def _steps(fields: dict[str, Any]) -> dict[str, bytes]:
    """The ``p:<name>`` fields of a record: its steps' encoded values."""
    return {name[2:]: _bytes(value) for name, value in fields.items() if name[:2] == "p:"}
