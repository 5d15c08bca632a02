"""Model-based test of the store contract: random interleavings of every transition from
several attempts, with time moving, on MemoryStore (a controllable clock) and on a real
redis-server (short real TTLs, real waits). Each answer and each record is checked against a
small pure-Python model of the transitions (docs/architecture.md, "States and transitions"
and "Record lifetime"), and the fencing-token rule is checked on its own.

Time on Redis is only known to lie between a reading before and one after each call, so the
model works with spans: a deadline that might or might not have passed is a fork, and the
model follows whichever branch the store's answer matches (a fork no branch matches fails).
The durations are chosen so that forks are rare: steps of time are whole multiples of
``STEP_MS`` and no deadline is, so every deadline stays tens of ms away from a step.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import idemtask.store
from idemtask.store import Answer, Lease, MemoryStore, Record, RedisStore, State, Status, Store
from idemtask.store.base import RECORD_FIELDS, SCRIPT_REPLIES

STEP_MS = 100
LEASE_MS = 130
RESULT_TTL_MS = 530
RESERVATION_MS = 170
MAX_DELIVERIES = 2
TASK_NAME = "shop.charge"
ATTEMPTS = ("a1", "a2", "a3")
TASKS = ("t1", "t2")
FINGERPRINTS = ("fa", "fa", "fa", "", "fb")
RESULTS = (None, b"1", b'"x"', b"")


@dataclass(frozen=True)
class Span:
    """A time in ms known to lie in ``[lo, hi]``."""

    lo: int
    hi: int

    def __add__(self, ms: int) -> Span:
        return Span(self.lo + ms, self.hi + ms)

    def later(self, other: Span) -> Span:
        return Span(max(self.lo, other.lo), max(self.hi, other.hi))

    def until(self, deadline: Span) -> Span:
        """How long from this time to ``deadline``."""
        return Span(deadline.lo - self.hi, deadline.hi - self.lo)


ZERO = Span(0, 0)


@dataclass
class Rec:
    """The model of one record."""

    created: Span
    state: State = State.IDLE
    task_id: str = ""
    task_name: str = ""
    holder: str = ""
    token: int = 0
    lease_until: Span = ZERO
    fingerprint: str = ""
    deliveries: int = 0
    result: bytes | None = None
    error: str = ""
    grace: int = 0  # the result TTL the record outlives its lease by
    expires: Span = ZERO
    updated: Span = ZERO


class Run:
    """One way an operation can go: answers the "has this deadline passed?" questions,
    taking ``choices`` for those the time spans leave open."""

    def __init__(self, records: dict[str, Rec], now: Span, choices: list[bool]) -> None:
        self.records = copy.deepcopy(records)
        self.now = now
        self.choices = choices
        self.asked = 0

    def passed(self, deadline: Span) -> bool:
        if deadline.hi <= self.now.lo:
            return True
        if deadline.lo > self.now.hi:
            return False
        if self.asked == len(self.choices):
            self.choices.append(False)
        self.asked += 1
        return self.choices[self.asked - 1]

    def live(self, key: str) -> Rec | None:
        rec = self.records.get(key)
        if rec is not None and self.passed(rec.expires):
            del self.records[key]
            return None
        return rec

    def held(self, key: str, attempt: str, token: int) -> Rec | None:
        rec = self.live(key)
        if rec and rec.state is State.RUNNING and (rec.holder, rec.token) == (attempt, token):
            return rec
        return None

    def create(self, key: str) -> Rec:
        rec = self.records[key] = Rec(created=self.now)
        return rec


Expected = dict[str, Any]
Transition = Callable[[Run], Expected]


def conflicts(stored: str, given: str) -> bool:
    return bool(given) and bool(stored) and stored != given


# -- the model: one function per transition ---------------------------------------------


def m_reserve(run: Run, key: str, task_id: str, fp: str) -> Expected:
    rec, now = run.live(key), run.now
    if rec is not None:
        if conflicts(rec.fingerprint, fp):
            return {"status": Status.CONFLICT, "task_id": rec.task_id}
        duplicate = {"status": Status.DUPLICATE, "task_id": rec.task_id, "state": rec.state}
        if rec.state is State.DONE:
            return duplicate | {"result": rec.result}
        if rec.state is State.FAILED:
            return duplicate | {"result": None}
        if rec.state in (State.QUEUED, State.RUNNING) and not run.passed(rec.lease_until):
            return duplicate | {"result": None}
    else:
        rec = run.create(key)
    rec.state, rec.task_id, rec.task_name = State.QUEUED, task_id, TASK_NAME
    rec.lease_until, rec.updated = now + RESERVATION_MS, now
    rec.fingerprint = fp or rec.fingerprint
    rec.expires = rec.expires.later(now + max(RESULT_TTL_MS, RESERVATION_MS))
    return {"status": Status.NEW, "task_id": task_id}


def m_cancel(run: Run, key: str, task_id: str) -> Expected:
    rec = run.live(key)
    if rec is not None and rec.state is State.QUEUED and rec.task_id == task_id:
        rec.state, rec.lease_until, rec.updated = State.IDLE, ZERO, run.now
        return {"status": Status.RELEASED, "task_id": task_id}
    return {
        "status": Status.STALE,
        "task_id": rec.task_id if rec else "",
        "state": rec.state if rec else None,
        "result": None,
    }


def m_acquire(run: Run, key: str, task_id: str, attempt: str, fp: str) -> Expected:
    rec, now, takeover = run.live(key), run.now, False
    if rec is not None:
        if conflicts(rec.fingerprint, fp):
            return {"status": Status.CONFLICT, "task_id": rec.task_id}
        if rec.state is State.DONE:
            return {"status": Status.DONE, "task_id": rec.task_id, "result": rec.result}
        if rec.state is State.FAILED:
            return {"status": Status.FAILED, "task_id": rec.task_id, "error": rec.error}
        if rec.state is State.RUNNING:
            if not run.passed(rec.lease_until):
                left = now.until(rec.lease_until)
                return {"status": Status.BUSY, "task_id": rec.task_id, "lease_left": left}
            takeover = True
    else:
        rec = run.create(key)
    if rec.deliveries >= MAX_DELIVERIES:
        deliveries = rec.deliveries
        rec.error = f"poison: {deliveries} deliveries ended without a result"
        m_finish(rec, State.FAILED, now)
        return {
            "status": Status.POISONED,
            "task_id": rec.task_id,
            "deliveries": deliveries,
            "error": rec.error,
        }
    rec.token, rec.deliveries = rec.token + 1, rec.deliveries + 1
    rec.state, rec.task_id, rec.task_name, rec.holder = State.RUNNING, task_id, TASK_NAME, attempt
    rec.lease_until, rec.updated, rec.grace = now + LEASE_MS, now, RESULT_TTL_MS
    rec.fingerprint = fp or rec.fingerprint
    rec.expires = rec.expires.later(now + LEASE_MS + RESULT_TTL_MS)
    return {
        "status": Status.ACQUIRED,
        "task_id": task_id,
        "token": rec.token,
        "takeover": takeover,
        "deliveries": rec.deliveries,
    }


def m_renew(run: Run, key: str, attempt: str, token: int) -> Expected:
    rec = run.held(key, attempt, token)
    if rec is not None:
        rec.lease_until = run.now + LEASE_MS
        rec.expires = rec.expires.later(run.now + LEASE_MS + rec.grace)
    return {"renewed": rec is not None}


def m_complete(run: Run, key: str, attempt: str, token: int, result: bytes | None) -> Expected:
    rec = run.held(key, attempt, token)
    if rec is None:
        current = run.live(key)
        if current is None:
            return {"status": Status.STALE, "task_id": "", "state": None, "result": None}
        return {
            "status": Status.STALE,
            "task_id": current.task_id,
            "state": current.state,
            "result": current.result,
        }
    rec.result, rec.error = result, ""
    m_finish(rec, State.DONE, run.now)
    return {"status": Status.COMPLETED, "task_id": rec.task_id}


def m_release(run: Run, key: str, attempt: str, token: int, error: str, terminal: bool) -> Expected:
    rec = run.held(key, attempt, token)
    if rec is None:
        current = run.live(key)
        return {
            "status": Status.STALE,
            "task_id": current.task_id if current else "",
            "state": current.state if current else None,
            "result": None,
        }
    rec.error = error
    if terminal:
        m_finish(rec, State.FAILED, run.now)
    else:
        rec.state, rec.holder, rec.lease_until, rec.deliveries = State.IDLE, "", ZERO, 0
        rec.updated = run.now
        rec.expires = rec.expires.later(run.now + RESULT_TTL_MS)
    return {"status": Status.RELEASED, "task_id": rec.task_id}  # the state: records_match


def m_finish(rec: Rec, state: State, now: Span) -> None:
    """A terminal record keeps no lease, holder, deliveries, result TTL or created time, and
    lives exactly the result TTL."""
    rec.state, rec.updated, rec.expires = state, now, now + RESULT_TTL_MS
    rec.holder, rec.lease_until, rec.deliveries, rec.grace, rec.created = "", ZERO, 0, 0, ZERO


def m_forget(run: Run, key: str) -> Expected:
    existed = run.live(key) is not None
    run.records.pop(key, None)
    return {"existed": existed}


def m_inspect(run: Run, key: str) -> Expected:
    rec = run.live(key)
    if rec is None:
        return {"exists": False}
    return {
        "exists": True,
        "state": rec.state,
        "task_id": rec.task_id,
        "task_name": rec.task_name,
        "holder": rec.holder,
        "token": rec.token,
        "lease_until_ms": rec.lease_until,
        "fingerprint": rec.fingerprint,
        "deliveries": rec.deliveries,
        "result": rec.result,
        "error": rec.error,
        "created_ms": rec.created,
        "updated_ms": rec.updated,
        "ttl_ms": run.now.until(rec.expires),
    }


def branches(records: dict[str, Rec], now: Span, step: Transition) -> list[tuple[Expected, Run]]:
    """Every way ``step`` can go from ``records`` at a time within ``now``."""
    found, pending = [], [list[bool]()]
    while pending:
        prefix = pending.pop()
        run = Run(records, now, list(prefix))
        found.append((step(run), run))
        pending += [[*run.choices[:j], True] for j in range(len(prefix), len(run.choices))]
    return found


def observed(answer: Any) -> Expected:
    """What a store answered, in the model's terms."""
    if isinstance(answer, get_args(Answer)):
        fields = {f.name: getattr(answer, f.name) for f in dataclasses.fields(answer)}
        if "lease_left_ms" in fields:
            fields["lease_left"] = fields.pop("lease_left_ms")
        if fields.get("result") is not None:
            fields["result"] = fields["result"].data
        return {"status": answer.status, **fields}
    if isinstance(answer, Record):
        fields = {name: getattr(answer, name) for name in Record.__dataclass_fields__}
        fields["result"] = None if answer.result is None else answer.result.data
        return fields | {"exists": True}
    if answer is None:
        return {"exists": False}
    return {"value": answer}


def matches(expected: Expected, actual: Expected) -> bool:
    if "status" in expected and set(expected) != set(actual):
        return False  # an answer carries exactly the fields the model gives it
    for name, want in expected.items():
        got = actual.get(name)
        if isinstance(want, Span):
            if not (isinstance(got, int) and want.lo <= got <= want.hi):
                return False
        elif got != want:
            return False
    return True


# -- the machine --------------------------------------------------------------------------


@dataclass
class Issued:
    """A token handed out, and when its holder's lease ended (or will end)."""

    token: int
    ends: Span
    attempt: str


@dataclass
class Held:
    key: str
    token: int


@dataclass
class World:
    records: dict[str, Rec] = field(default_factory=dict)
    leases: dict[str, Held] = field(default_factory=dict)  # what each attempt believes
    issued: dict[str, list[Issued]] = field(default_factory=dict)


class StoreMachine(RuleBasedStateMachine):
    """Subclasses say which store, how time is read and how it moves."""

    slack_ms = 0

    def __init__(self) -> None:
        super().__init__()
        self.store = self.make_store()
        run = uuid.uuid4().hex[:8]
        self.keys = (f"{run}-k1", f"{run}-k2")
        self.world = World(issued={key: [] for key in self.keys})

    def make_store(self) -> Store:
        raise NotImplementedError

    def now_ms(self) -> int:
        raise NotImplementedError

    def elapse(self, ms: int) -> None:
        raise NotImplementedError

    # -- driving one step ------------------------------------------------------------

    def step(self, name: str, call: Callable[[], Any], model: Transition) -> tuple[Any, Span]:
        before = self.now_ms()
        answer = call()
        now = Span(before - self.slack_ms, self.now_ms() + self.slack_ms)
        actual = observed(answer)
        candidates = branches(self.world.records, now, model)
        for expected, run in candidates:
            if matches(expected, actual):
                self.world.records = run.records
                return answer, now
        raise AssertionError(
            f"{name} at {now}: the store answered {actual}; the model expected "
            + " or ".join(str(expected) for expected, _ in candidates)
        )

    def holding(self, pick: int, skew: int) -> tuple[str, str, int]:
        """An attempt that took a lease (maybe lost since), its key and its token + skew."""
        holders = sorted(self.world.leases) or list(ATTEMPTS)
        attempt = holders[pick % len(holders)]
        held = self.world.leases.get(attempt, Held(self.keys[0], 1))
        return attempt, held.key, held.token + skew

    def lease_ended(self, key: str, token: int, at: Span) -> None:
        for issued in self.world.issued[key]:
            if issued.token == token:
                issued.ends = at

    # -- rules ---------------------------------------------------------------------------

    keys_index = st.integers(0, 1)
    skews = st.sampled_from([0, 0, 0, 1, -1])
    picks = st.integers(0, len(ATTEMPTS) - 1)

    @rule(k=keys_index, task=st.sampled_from(TASKS), fp=st.sampled_from(FINGERPRINTS))
    def reserve(self, k: int, task: str, fp: str) -> None:
        key = self.keys[k]
        self.step(
            "reserve",
            lambda: self.store.reserve(
                key,
                task_id=task,
                task_name=TASK_NAME,
                fingerprint=fp,
                reservation_ms=RESERVATION_MS,
                ttl_ms=RESULT_TTL_MS,
            ),
            lambda run: m_reserve(run, key, task, fp),
        )

    @rule(k=keys_index, task=st.sampled_from(TASKS))
    def cancel(self, k: int, task: str) -> None:
        key = self.keys[k]
        self.step(
            "cancel",
            lambda: self.store.cancel(key, task_id=task),
            lambda run: m_cancel(run, key, task),
        )

    @rule(
        k=keys_index,
        attempt=st.sampled_from(ATTEMPTS),
        task=st.sampled_from(TASKS),
        fp=st.sampled_from(FINGERPRINTS),
    )
    def acquire(self, k: int, attempt: str, task: str, fp: str) -> None:
        key = self.keys[k]
        out, now = self.step(
            "acquire",
            lambda: self.store.acquire(
                key,
                task_id=task,
                attempt_id=attempt,
                task_name=TASK_NAME,
                fingerprint=fp,
                lease_ms=LEASE_MS,
                max_deliveries=MAX_DELIVERIES,
                ttl_ms=RESULT_TTL_MS,
            ),
            lambda run: m_acquire(run, key, task, attempt, fp),
        )
        if out.status is Status.ACQUIRED:
            self.check_token_goes_up(key, out.token, now)
            self.world.leases[attempt] = Held(key, out.token)
            self.world.issued[key].append(Issued(out.token, now + LEASE_MS, attempt))

    @rule(pick=picks, skew=skews)
    def renew(self, pick: int, skew: int) -> None:
        attempt, key, token = self.holding(pick, skew)
        renewed, now = self.step(
            "renew",
            lambda: self.store.renew(Lease(key, attempt, token, LEASE_MS)),
            lambda run: {"value": m_renew(run, key, attempt, token)["renewed"]},
        )
        if renewed:
            self.lease_ended(key, token, now + LEASE_MS)

    @rule(pick=picks, skew=skews, result=st.sampled_from(RESULTS))
    def complete(self, pick: int, skew: int, result: bytes | None) -> None:
        attempt, key, token = self.holding(pick, skew)
        out, now = self.step(
            "complete",
            lambda: self.store.complete(
                key, attempt_id=attempt, token=token, result=result, result_ttl_ms=RESULT_TTL_MS
            ),
            lambda run: m_complete(run, key, attempt, token, result),
        )
        if out.status is Status.COMPLETED:
            self.lease_ended(key, token, now)

    @rule(
        pick=picks,
        skew=skews,
        error=st.sampled_from(["E1", "E2"]),
        terminal=st.booleans(),
    )
    def release(self, pick: int, skew: int, error: str, terminal: bool) -> None:
        attempt, key, token = self.holding(pick, skew)
        out, now = self.step(
            "release",
            lambda: self.store.release(
                key,
                attempt_id=attempt,
                token=token,
                error=error,
                terminal=terminal,
                ttl_ms=RESULT_TTL_MS,
            ),
            lambda run: m_release(run, key, attempt, token, error, terminal),
        )
        if out.status is Status.RELEASED:
            self.lease_ended(key, token, now)

    @rule(k=keys_index, now=st.sampled_from([True, False, False, False]))
    def forget(self, k: int, now: bool) -> None:
        if not now:  # rarely: a forget throws away everything the steps before built up
            return
        key = self.keys[k]
        self.step(
            "forget",
            lambda: self.store.forget(key),
            lambda run: {"value": m_forget(run, key)["existed"]},
        )
        self.world.issued[key].clear()  # forget is the one way tokens may start again

    @rule(ms=st.sampled_from([STEP_MS, 2 * STEP_MS, 3 * STEP_MS, 4 * STEP_MS]))
    def advance(self, ms: int) -> None:
        self.elapse(ms)

    # -- invariants ------------------------------------------------------------------

    def check_token_goes_up(self, key: str, token: int, now: Span) -> None:
        """A token goes up past every token an attempt could still hold or write with: one
        whose lease ended less than the result TTL ago."""
        for issued in self.world.issued[key]:
            if now.hi < issued.ends.lo + RESULT_TTL_MS:
                assert token > issued.token, (
                    f"{key}: token {token} handed out while {issued.attempt}'s token "
                    f"{issued.token} was in use (its lease ends {issued.ends}, now {now})"
                )

    @invariant()
    def records_match_the_model(self) -> None:
        for key in self.keys:
            self.inspect(key)

    def inspect(self, key: str) -> None:
        self.step("inspect", lambda: self.store.inspect(key), lambda run: m_inspect(run, key))

    def teardown(self) -> None:
        close = getattr(getattr(self.store, "client", None), "close", None)
        if close is not None:
            close()


class MemoryMachine(StoreMachine):
    def make_store(self) -> Store:
        self.clock_s = 1_000.0
        return MemoryStore(clock=lambda: self.clock_s)

    def now_ms(self) -> int:
        return int(self.clock_s * 1000)  # the very expression MemoryStore uses

    def elapse(self, ms: int) -> None:
        self.clock_s = (self.now_ms() + ms) / 1000


class RedisMachine(StoreMachine):
    slack_ms = 2  # ms rounding between this process's clock and the server's TIME
    url = ""

    def make_store(self) -> Store:
        self.started = time.monotonic()
        self.schedule_ms = 0
        return RedisStore.from_url(self.url)

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def elapse(self, ms: int) -> None:
        # Wait until a point on a fixed schedule, so slow calls do not add up.
        self.schedule_ms += ms
        time.sleep(max(0.0, self.started + self.schedule_ms / 1000 - time.monotonic()))


COMMON: dict[str, Any] = {
    "derandomize": True,
    "database": None,
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow],
}


def test_memory_store_follows_the_model() -> None:
    run_state_machine_as_test(
        MemoryMachine, settings=settings(max_examples=300, stateful_step_count=40, **COMMON)
    )


def test_redis_store_follows_the_model(redis_url: str) -> None:
    machine = type("RedisAt", (RedisMachine,), {"url": redis_url})
    run_state_machine_as_test(
        machine, settings=settings(max_examples=60, stateful_step_count=30, **COMMON)
    )


def test_the_scripts_keep_to_the_documented_record() -> None:
    """Every hash field a script reads or writes, and every script, is in the legend."""
    lua = Path(idemtask.store.__file__).parent / "lua"
    scripts = {path.stem: path.read_text() for path in lua.glob("*.lua")}
    assert set(scripts) - {"_prelude"} == set(SCRIPT_REPLIES)
    for name, source in scripts.items():
        code = re.sub(r"--[^\n]*", "", source)
        used = set(re.findall(r"'([a-zA-Z])'", code))  # a one-letter string is a hash field
        used |= set(re.findall(r"'([a-z]:)'", code))  # a field prefix: 'p:' .. name
        assert used <= set(RECORD_FIELDS), (name, used - set(RECORD_FIELDS))
