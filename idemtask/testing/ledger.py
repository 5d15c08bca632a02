"""The effect ledger: what the task bodies really did, recorded outside idemtask's store.

Worker processes append to it; the test reads it back and checks the guarantees with
``checks``. It lives in its own Redis list (use a Redis, or at least a
database, that is not the store under test: the store may be killed and restarted).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from idemtask import context
from idemtask.events import Decision, Event, add_observer, remove_observer

# The guard decisions the checks need, recorded with the token they concern.
_OBSERVED = {
    Decision.ACQUIRED,
    Decision.TAKEOVER,
    Decision.COMPLETED,
    Decision.STALE_COMPLETION,
    Decision.REPLAYED,
    Decision.DEFERRED,
    Decision.LEASE_LOST,
    Decision.POISON,
    Decision.RELEASED,
    Decision.DROPPED,
    Decision.STORE_UNAVAILABLE,
    Decision.RENEWED,  # one entry per renewal round trip (token: how many leases it renewed)
}


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the ledger."""

    kind: str  # "start", "end", "effect", "fenced_effect", "effect_done" or a guard decision
    key: str
    attempt: str
    token: int
    at: float  # time.time() of the event; every process of a run shares one clock
    pid: int
    task_id: str = ""
    ok: bool = True  # end: the body returned; fenced_effect: the write was accepted
    #: The broker delivery the entry belongs to (``begin_delivery``), "" outside one.
    delivery: str = ""


class EffectLedger:
    """Append-only record of body starts and ends, side effects and guard decisions."""

    def __init__(self, client: redis.Redis, name: str = "idemtask-ledger") -> None:
        self.client = client
        self.name = name
        self._local = threading.local()  # the delivery this thread is handling

    @property
    def url(self) -> str:
        """Where worker processes find this ledger (``EffectLedger.from_url(url, name)``)."""
        kw = self.client.connection_pool.connection_kwargs
        return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"

    @classmethod
    def from_url(cls, url: str, name: str = "idemtask-ledger") -> EffectLedger:
        return cls(redis.Redis.from_url(url), name)

    def _append(self, entry: Entry) -> None:
        self.client.rpush(self.name, json.dumps(_asdict(entry)))

    def record(
        self,
        kind: str,
        *,
        key: str,
        attempt: str = "",
        token: int = 0,
        task_id: str = "",
        ok: bool = True,
        pid: int | None = None,
        delivery: str | None = None,
    ) -> None:
        """Append one entry; fault injectors record ``killed``/``stopped`` with the pid hit.
        ``delivery`` defaults to the one this thread is handling (``begin_delivery``)."""
        pid = os.getpid() if pid is None else pid
        if delivery is None:
            delivery = self.current_delivery()
        entry = Entry(kind, key, attempt, token, time.time(), pid, task_id, ok, delivery)
        self._append(entry)

    # -- deliveries: what the broker handed over, and what became of it ---------------------

    def begin_delivery(self, *, key: str, task_id: str, name: str = "") -> str:
        """A worker thread took a message from the broker: records ``delivered`` and tags
        every entry this thread records until ``end_delivery`` with the delivery's id, so the
        checks can tell what each delivery did before it was acked. ``name`` is the plan's
        name for the key (kept in ``attempt``)."""
        delivery = uuid.uuid4().hex[:16]
        self._local.delivery = delivery
        self.record("delivered", key=key, attempt=name, task_id=task_id)
        return delivery

    def end_delivery(self) -> str:
        """This thread is done with its delivery; returns its id (\"\" if none)."""
        delivery = self.current_delivery()
        self._local.delivery = ""
        return delivery

    def current_delivery(self) -> str:
        return str(getattr(self._local, "delivery", ""))

    def settled(self, kind: str, *, delivery: str, key: str = "", task_id: str = "") -> None:
        """What the worker told the broker about a delivery: ``acked`` (the message is
        gone), ``requeued`` or ``nacked``; may run in another thread than the delivery."""
        self.record(kind, key=key, task_id=task_id, delivery=delivery)

    def _note(self, kind: str, execution: context.Execution, ok: bool = True) -> None:
        self.record(
            kind,
            key=execution.key,
            attempt=execution.attempt_id,
            token=execution.fencing_token,
            task_id=execution.task_id,
            ok=ok,
        )

    @contextlib.contextmanager
    def body(self) -> Iterator[context.Execution]:
        """Wrap a task body: records its start and its end with the attempt and token."""
        execution = context.current()
        self._note("start", execution)
        try:
            yield execution
        except BaseException:
            self._note("end", execution, ok=False)
            raise
        self._note("end", execution)

    def effect(self) -> None:
        """A side effect of the running body (an e-mail sent, a card charged)."""
        self._note("effect", context.current())

    def effect_done(self) -> None:
        """The body's effects are done (committed, where they commit): a crash from here
        until the completion is the window that steps and ``idemtask.sql`` close."""
        self._note("effect_done", context.current())

    def fenced_effect(self) -> bool:
        """A side effect written through the fencing token: a downstream store that keeps the
        highest token per key and refuses lower or equal ones. True if it was accepted."""
        execution = context.current()
        fence = f"{self.name}:fence:{execution.key}"
        accepted = bool(self.client.eval(_FENCED_WRITE, 1, fence, execution.fencing_token))
        self._note("fenced_effect", execution, ok=accepted)
        return accepted

    def observe(self) -> None:
        """Record this process's guard decisions too (call once in every worker process)."""
        add_observer(self._on_event)

    def stop_observing(self) -> None:
        remove_observer(self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.decision not in _OBSERVED:
            return
        token = event.fields.get("leases" if event.decision is Decision.RENEWED else "token", 0)
        self.record(
            event.decision.value,
            key=event.key,
            token=token if isinstance(token, int) else 0,
            task_id=event.task_id,
        )

    def entries(self, start: int = 0) -> list[Entry]:
        """Every entry, or those from index ``start`` on (to follow a running ledger without
        reading it all again)."""
        return [Entry(**json.loads(raw)) for raw in self.client.lrange(self.name, start, -1)]

    def clear(self) -> None:
        self.client.delete(self.name)
        for name in self.client.scan_iter(match=f"{self.name}:fence:*"):
            self.client.delete(name)


_FENCED_WRITE = """
local seen = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) <= seen then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


def _asdict(entry: Entry) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in Entry.__slots__}


def new_ledger_name() -> str:
    return f"idemtask-ledger-{uuid.uuid4().hex[:8]}"
