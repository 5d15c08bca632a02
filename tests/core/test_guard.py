"""The guard engine's decisions, without Celery or Dramatiq, over both stores."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import idemtask
from idemtask.codecs import JsonCodec
from idemtask.errors import (
    AlreadyRunningError,
    IdempotencyConflict,
    LeaseLostError,
    PoisonMessageError,
    StoreUnavailable,
    TaskFailedError,
)
from idemtask.events import Decision, Event, add_observer, remove_observer
from idemtask.guard import (
    MAX_BUSY_DELAY,
    MIN_BUSY_DELAY,
    Attempt,
    Call,
    Deferred,
    Dropped,
    Existing,
    Guard,
    Replay,
    busy_delay,
)
from idemtask.policy import Policy
from idemtask.store import MemoryStore, RedisStore, State, Store

from servers import RedisServer

CODEC = JsonCodec()
FAST = Policy(lease=0.3, result_ttl=60, wait_timeout=2)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        yield RedisStore.from_url(request.getfixturevalue("redis_url"))


@pytest.fixture
def guard(store: Store) -> Guard:
    return Guard(store)


@pytest.fixture
def events() -> Iterator[list[Event]]:
    seen: list[Event] = []
    add_observer(seen.append)
    yield seen
    remove_observer(seen.append)


def call(fp: str = "fp") -> Call:
    return Call("shop.charge", uuid.uuid4().hex, fp)


class Body:
    """A body that counts its runs."""

    def __init__(self, value: Any = None, *, sleep: float = 0.0, error: Exception | None = None):
        self.value, self.sleep, self.error, self.runs = value, sleep, error, 0

    def __call__(self) -> Any:
        self.runs += 1
        time.sleep(self.sleep)
        if self.error is not None:
            raise self.error
        return self.value


def test_runs_once_then_replays_the_stored_value(guard: Guard, events: list[Event]) -> None:
    c, body = call(), Body({"charged": 10})
    assert guard.run(FAST, c, "t1", body, CODEC) == {"charged": 10}
    assert guard.run(FAST, c, "t2", body, CODEC) == {"charged": 10}
    assert body.runs == 1
    mine = [e.decision for e in events if e.key == c.key]
    assert mine == [Decision.ACQUIRED, Decision.COMPLETED, Decision.REPLAYED]


def test_reserve_returns_the_original_and_policies(guard: Guard) -> None:
    c = call()
    assert guard.reserve(FAST, c, "t1") is None
    existing = guard.reserve(FAST, c, "t2")
    assert isinstance(existing, Existing) and existing.task_id == "t1"
    assert (
        guard.reserve(FAST.with_options({"on_duplicate": "enqueue"}, source="t"), c, "t3") is None
    )
    with pytest.raises(idemtask.DuplicateTaskError) as info:
        guard.reserve(FAST.with_options({"on_duplicate": "raise"}, source="t"), c, "t4")
    assert info.value.existing_task_id == "t1"
    assert guard.reserve(FAST.with_options({"dedupe_enqueue": False}, source="t"), c, "t5") is None
    guard.run(FAST, c, "t1", Body(5), CODEC)
    done = guard.reserve(FAST, c, "t6")
    assert isinstance(done, Existing) and done.state is State.DONE
    assert done.result is not None and CODEC.decode(done.result.data) == 5


def test_cancel_lets_the_next_call_publish(guard: Guard) -> None:
    c = call()
    assert guard.reserve(FAST, c, "t1") is None
    guard.cancel(c, "t1")
    assert guard.reserve(FAST, c, "t2") is None


def _hold(guard: Guard, c: Call, task_id: str = "t1") -> Attempt:
    decided = guard.begin(FAST, c, task_id)
    assert isinstance(decided, Attempt)
    return decided


def test_busy_policies(guard: Guard) -> None:
    c = call()
    holder = _hold(guard, c)
    with pytest.raises(Deferred) as deferred:
        guard.begin(FAST, c, "t1")
    assert 0 < deferred.value.delay <= FAST.lease
    with pytest.raises(AlreadyRunningError) as running:
        guard.begin(FAST.with_options({"on_running": "raise"}, source="t"), c, "t2")
    assert running.value.holder_task_id == "t1"
    with pytest.raises(Dropped):
        guard.begin(FAST.with_options({"on_running": "drop"}, source="t"), c, "t2")
    guard.succeed(holder, "ok", CODEC)


def test_busy_delay_starts_short_doubles_and_is_capped() -> None:
    assert [busy_delay(n, 60) for n in range(6)] == [0.05, 0.1, 0.2, 0.25, 0.25, 0.25]
    assert busy_delay(10**6, 60) == MAX_BUSY_DELAY  # no overflow after many looks
    assert busy_delay(-3, 60) == MIN_BUSY_DELAY  # a nonsense count starts the schedule
    assert busy_delay(5, 0.08) == 0.08  # back when the holder's lease could run out
    assert busy_delay(5, 0.0) == MIN_BUSY_DELAY  # never a zero delay (a hot loop)


LONG = Policy(lease=30, result_ttl=60, wait_timeout=2)


def test_each_deferral_is_the_next_step_of_the_schedule(guard: Guard, events: list[Event]) -> None:
    """A copy deferred ``n`` times before gets the ``n``-th delay and carries ``n + 1``."""
    c = call()
    holder = guard.begin(LONG, c, "t1")
    assert isinstance(holder, Attempt)
    delays, counts = [], []
    for before in range(5):
        with pytest.raises(Deferred) as deferred:
            guard.delivery(LONG, c, "t2", CODEC, deferrals=before).decide()
        delays.append(deferred.value.delay)
        counts.append(deferred.value.deferrals)
    assert delays == [busy_delay(n, LONG.lease) for n in range(5)]
    assert delays == sorted(delays) and delays[0] < delays[-1] == MAX_BUSY_DELAY
    assert counts == [1, 2, 3, 4, 5]
    deferred_events = [e for e in events if e.key == c.key and e.decision is Decision.DEFERRED]
    assert [e.fields["deferrals"] for e in deferred_events] == counts
    assert [e.fields["delay"] for e in deferred_events] == delays
    guard.succeed(holder, "ok", CODEC)


def test_wait_polls_on_the_same_schedule_then_defers(guard: Guard, events: list[Event]) -> None:
    c = call()
    holder = guard.begin(LONG, c, "t1")
    assert isinstance(holder, Attempt)
    timeout = 0.6
    policy = LONG.with_options({"on_running": "wait", "wait_timeout": timeout}, source="t")
    with pytest.raises(Deferred) as deferred:
        guard.begin(policy, c, "t2")
    looks = [e for e in events if e.key == c.key and e.decision is Decision.BUSY]
    # Sleeps are never shorter than asked, so the schedule bounds the looks from above:
    # 0.05 + 0.1 + 0.2 + 0.25 > 0.6, so at most five looks before the deferral.
    slept, bound = 0.0, 1
    while slept < timeout:
        slept += busy_delay(bound - 1, LONG.lease)
        bound += 1
    assert 2 <= len(looks) <= bound == 5
    # The deferral continues the schedule where the polls left it.
    assert deferred.value.deferrals == len(looks)
    assert deferred.value.delay == busy_delay(len(looks) - 1, LONG.lease)
    guard.succeed(holder, "ok", CODEC)


def test_wait_policy_replays_once_the_holder_completes(guard: Guard) -> None:
    c = call()
    holder = _hold(guard, c)
    waiter_policy = FAST.with_options({"on_running": "wait", "wait_timeout": 5}, source="t")

    def finish_later() -> None:
        with guard.holding(holder):  # renewed while the body "runs"
            time.sleep(0.5)
        guard.succeed(holder, "from-holder", CODEC)

    finished = threading.Thread(target=finish_later)
    finished.start()
    started = time.monotonic()
    decided = guard.begin(waiter_policy, c, "t2")
    assert isinstance(decided, Replay) and decided.value(CODEC) == "from-holder"
    assert 0.4 < time.monotonic() - started < 3
    finished.join()


def test_wait_policy_defers_after_its_timeout(guard: Guard) -> None:
    c = call()
    holder = _hold(guard, c)
    with guard.holding(holder):  # renewed, so the waiter never sees it free
        policy = FAST.with_options({"on_running": "wait", "wait_timeout": 0.5}, source="t")
        with pytest.raises(Deferred):
            guard.begin(policy, c, "t2")


def test_failure_is_released_for_another_try(guard: Guard) -> None:
    c, failing = call(), Body(error=ValueError("card declined"))
    with pytest.raises(ValueError):
        guard.run(FAST, c, "t1", failing, CODEC)
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.IDLE
    assert "card declined" in record.error
    assert guard.run(FAST, c, "t1", Body("paid"), CODEC) == "paid"


def test_terminal_exceptions_are_replayed(guard: Guard) -> None:
    c = call()
    policy = FAST.with_options({"terminal_exceptions": (KeyError,)}, source="t")
    with pytest.raises(KeyError):
        guard.run(policy, c, "t1", Body(error=KeyError("no such order")), CODEC)
    again = Body("never")
    with pytest.raises(TaskFailedError) as failed:
        guard.run(policy, c, "t2", again, CODEC)
    assert again.runs == 0 and "KeyError" in failed.value.error


def test_conflicting_arguments_under_one_key(guard: Guard) -> None:
    c = call("fp-a")
    guard.run(FAST, c, "t1", Body(1), CODEC)
    other = Call(c.task_name, c.key, "fp-b")
    with pytest.raises(IdempotencyConflict):
        guard.run(FAST, other, "t2", Body(2), CODEC)
    with pytest.raises(IdempotencyConflict):
        guard.reserve(FAST, other, "t3")
    relaxed = FAST.with_options({"validate_payload": False}, source="t")
    assert guard.run(relaxed, other, "t4", Body(2), CODEC) == 1


def test_poison_after_repeated_unreported_deliveries(guard: Guard) -> None:
    c = call()
    policy = FAST.with_options({"max_deliveries": 2}, source="t")
    for _ in range(2):
        assert isinstance(guard.begin(policy, c, "t1"), Attempt)  # then "crash": no report
        time.sleep(FAST.lease + 0.05)
    with pytest.raises(PoisonMessageError):
        guard.begin(policy, c, "t1")


def test_lease_renewal_keeps_a_long_body_exclusive(guard: Guard) -> None:
    c = call()
    seen: list[str] = []

    def long_body() -> str:
        for _ in range(4):
            time.sleep(FAST.lease / 2)
            try:
                guard.begin(FAST, c, "copy")
            except Deferred:
                seen.append("deferred")
        return "done"

    renewals = guard.leases.renewals
    assert guard.run(FAST, c, "t1", long_body, CODEC) == "done"
    assert seen == ["deferred"] * 4
    assert guard.leases.renewals - renewals >= 3


def test_context_inside_the_body(guard: Guard) -> None:
    c = call()
    with pytest.raises(LookupError):
        idemtask.current()

    def body() -> dict[str, Any]:
        now = idemtask.current()
        return {"key": now.key, "token": now.fencing_token, "lost": now.lease_lost}

    assert guard.run(FAST, c, "t1", body, CODEC) == {"key": c.key, "token": 1, "lost": False}
    with pytest.raises(LookupError):
        idemtask.current()


def test_stale_completion_returns_the_winners_result(store: Store) -> None:
    slow, fast = Guard(store), Guard(store)
    c = call()
    attempt = _hold(slow, c)
    with slow.holding(attempt):
        slow.leases.drop(attempt.attempt_id)  # the process froze: no renewal
        time.sleep(FAST.lease + 0.05)
        assert fast.run(FAST, c, "t2", Body("winner"), CODEC) == "winner"
        assert slow.succeed(attempt, "loser", CODEC) == "winner"
    record = store.inspect(c.key)
    assert record is not None and record.result is not None
    assert CODEC.decode(record.result.data) == "winner" and record.token == 2


def test_stale_completion_without_a_winner_raises_lease_lost(store: Store) -> None:
    slow, other = Guard(store), Guard(store)
    c = call()
    attempt = _hold(slow, c)
    time.sleep(FAST.lease + 0.05)
    taken = other.begin(FAST, c, "t2")
    assert isinstance(taken, Attempt) and taken.takeover
    with pytest.raises(LeaseLostError):
        slow.succeed(attempt, "late", CODEC)


def test_lease_lost_is_visible_to_the_body() -> None:
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    guard, rival = Guard(store), Guard(store)
    c = call()
    attempt = _hold(guard, c)
    with guard.holding(attempt) as execution:
        now[0] += FAST.lease + 1  # the lease ran out (a long GC pause, a stopped process)
        assert isinstance(rival.begin(FAST, c, "t2"), Attempt)
        guard.leases.renew_now()
        assert execution.lease_lost is True
        assert idemtask.current().lease_lost is True


def test_an_oversized_result_is_one_failure_for_every_delivery(guard: Guard) -> None:
    """The store cannot hold the value, so no later delivery could replay it: every one,
    the first included, gets the same error naming the size, never a silent ``None``."""
    c = call()
    policy = FAST.with_options({"max_result_bytes": 10}, source="t")
    with pytest.raises(TaskFailedError) as original:
        guard.run(policy, c, "t1", Body("x" * 100), CODEC)
    replayed = Body("again")
    with pytest.raises(TaskFailedError) as later:
        guard.run(policy, c, "t2", replayed, CODEC)
    assert replayed.runs == 0
    assert str(original.value) == str(later.value)
    assert "result not stored (102 bytes > max_result_bytes=10)" in str(original.value)
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.FAILED


def test_a_completion_recorded_without_a_result_is_not_replayed_as_none(guard: Guard) -> None:
    """A ``done`` record without a stored result (written before oversized results failed
    the key) has no answer to replay: a delivery says so instead of returning ``None``."""
    c = call()
    attempt = _hold(guard, c)
    guard.store.complete(
        c.key, attempt_id=attempt.attempt_id, token=attempt.token, result=None, result_ttl_ms=60_000
    )
    with pytest.raises(TaskFailedError, match="without a stored result"):
        guard.run(FAST, c, "t2", lambda: pytest.fail("a done key must not run again"), CODEC)


def _guard_on(server: RedisServer) -> Guard:
    """A guard whose store gives up on a stopped server within a second."""
    return Guard(RedisStore.from_url(server.url, socket_timeout=1, socket_connect_timeout=1))


def _run_while_down(
    server: RedisServer,
    guard: Guard,
    policy: Policy,
    c: Call,
    body: Callable[[], str],
    *,
    value: str,
    raised: str,
) -> None:
    """Run ``body`` (which stops ``server``) under the guard, then start the server again.
    As ``policy.on_store_error`` says: ``run`` hands back ``value``, ``raise`` raises a
    ``StoreUnavailable`` matching ``raised``, ``defer`` a ``Deferred`` with a delay."""
    try:
        if policy.on_store_error == "run":
            assert guard.run(policy, c, "t1", body, CODEC) == value
        elif policy.on_store_error == "raise":
            with pytest.raises(StoreUnavailable, match=raised):
                guard.run(policy, c, "t1", body, CODEC)
        else:
            with pytest.raises(Deferred) as deferred:
                guard.run(policy, c, "t1", body, CODEC)
            assert deferred.value.delay > 0
    finally:
        server.start()


def test_store_outage_policies(fresh_redis: Callable[..., RedisServer]) -> None:
    server = fresh_redis()
    guard = _guard_on(server)
    server.stop()
    c = call()
    with pytest.raises(Deferred) as deferred:
        guard.begin(FAST, c, "t1")
    assert deferred.value.delay > 0
    body = Body("ran")
    run_anyway = FAST.with_options({"on_store_error": "run"}, source="t")
    assert guard.run(run_anyway, c, "t1", body, CODEC) == "ran" and body.runs == 1
    with pytest.raises(StoreUnavailable):
        guard.begin(FAST.with_options({"on_store_error": "raise"}, source="t"), c, "t1")
    # Enqueue publishes anyway: the execute guard still protects the message.
    assert guard.reserve(FAST, c, "t1") is None
    with pytest.raises(StoreUnavailable):
        guard.reserve(FAST.with_options({"on_store_error": "raise"}, source="t"), c, "t1")
    server.start()
    assert guard.run(FAST, c, "t1", Body("back"), CODEC) == "back"


def test_completion_survives_a_short_store_outage(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    server = fresh_redis(appendonly=True)
    guard = _guard_on(server)
    c = call()
    policy = FAST.with_options({"lease": 10}, source="t")

    def body() -> str:
        server.stop()
        threading.Timer(1.0, server.start).start()
        return "paid"

    assert guard.run(policy, c, "t1", body, CODEC) == "paid"
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.DONE


@pytest.mark.parametrize("on_store_error", ["defer", "raise", "run"])
def test_a_completion_the_store_never_takes_keeps_the_message(
    fresh_redis: Callable[..., RedisServer], on_store_error: str
) -> None:
    """The store stays down past the lease after the body ran: nothing was recorded, so the
    delivery must not answer as if it had been (its message would be acked, the record left
    ``running`` with no copy left to finish it). ``defer`` keeps the message, ``raise``
    fails it into the framework; only ``run`` (fail open) hands back the value."""
    server = fresh_redis(appendonly=True)
    guard = _guard_on(server)
    c = call()
    policy = FAST.with_options({"on_store_error": on_store_error}, source="t")

    def body() -> str:
        server.stop()
        return "paid"

    _run_while_down(server, guard, policy, c, body, value="paid", raised="completion")
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.RUNNING


@pytest.mark.parametrize("on_store_error", ["defer", "raise", "run"])
def test_a_terminal_failure_the_store_never_takes_keeps_the_message(
    fresh_redis: Callable[..., RedisServer], on_store_error: str
) -> None:
    """As for a completion: a terminal error that could not be recorded is not the key's
    answer yet (a later call would run the body and might answer otherwise), so the message
    is kept; only ``run`` lets the body's own error through."""
    server = fresh_redis(appendonly=True)
    guard = _guard_on(server)
    c = call()
    options = {"on_store_error": on_store_error, "terminal_exceptions": (LookupError,)}
    policy = FAST.with_options(options, source="t")

    def body() -> str:
        server.stop()
        raise LookupError("no such order")

    expected = {"defer": Deferred, "raise": StoreUnavailable, "run": LookupError}
    try:
        with pytest.raises(expected[on_store_error]):
            guard.run(policy, c, "t1", body, CODEC)
    finally:
        server.start()
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.RUNNING


@pytest.mark.parametrize("on_store_error", ["defer", "raise", "run"])
@pytest.mark.parametrize("at", ["record", "read"])
def test_a_step_the_store_never_takes_keeps_the_message(
    fresh_redis: Callable[..., RedisServer], on_store_error: str, at: str
) -> None:
    """The store goes down inside the body and stays down past the lease, so a step can be
    neither recorded (``record``) nor, for an attempt that took the key over, read
    (``read``). The body stops there, and its message must not be failed into the framework
    as if the body had (it would be acked, the record left ``running`` with no copy left to
    finish it): ``defer`` keeps it, ``raise`` fails it with ``StoreUnavailable``; ``run``
    (fail open) runs the step unrecorded and the body goes on."""
    server = fresh_redis(appendonly=True)
    guard = _guard_on(server)
    c = call()
    policy = FAST.with_options({"on_store_error": on_store_error}, source="t")
    if at == "read":  # an earlier attempt whose lease ran out: this one takes the key over
        first = guard.begin(policy, c, "t0")
        assert isinstance(first, Attempt)
        time.sleep(policy.lease + 0.1)
    charges: list[str] = []

    def body() -> str:
        server.stop()
        charged = idemtask.step("charge", lambda: charges.append("ch_1") or "ch_1")
        return f"paid with {charged}"

    what = "step 'charge' of key .* recorded" if at == "record" else "steps .* read"
    _run_while_down(server, guard, policy, c, body, value="paid with ch_1", raised=what)
    assert charges == (["ch_1"] if at == "record" or on_store_error == "run" else [])
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.RUNNING
    assert record.steps == {}


def test_delivery_decides_once_and_records_once(guard: Guard) -> None:
    c = call()
    delivery = guard.delivery(FAST, c, "t1", CODEC)
    attempt = delivery.decide()
    assert isinstance(attempt, Attempt) and delivery.decide() is attempt
    assert delivery.run(lambda: 5) == 5
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.DONE
    replay = guard.delivery(FAST, c, "t2", CODEC)
    assert replay.run(lambda: pytest.fail("a done key must not run again")) == 5


def test_delivery_released_mid_body_records_nothing_more(guard: Guard) -> None:
    c = call()
    delivery = guard.delivery(FAST, c, "t1", CODEC)

    def body() -> int:
        delivery.release(RuntimeError("retry"))
        return 1

    assert delivery.run(body) == 1
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.IDLE


def test_an_abandoned_delivery_gives_the_key_back(guard: Guard) -> None:
    c = call()
    delivery = guard.delivery(FAST, c, "t1", CODEC)
    delivery.decide()
    delivery.abandon(RuntimeError("skipped"))
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.IDLE
    assert guard.leases.held() == []


def test_an_abandoned_delivery_never_fails_the_key_for_its_reason(guard: Guard) -> None:
    """The body never ran: the skip's reason says nothing about the call, even when its class
    is one of ``terminal_exceptions``, so the key goes back idle and the next delivery runs."""
    c = call()
    every_error_final = FAST.with_options({"terminal_exceptions": (Exception,)}, source="t")
    delivery = guard.delivery(every_error_final, c, "t1", CODEC)
    delivery.decide()
    delivery.abandon(LookupError("skipped by another middleware"))
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.IDLE
    assert guard.run(every_error_final, c, "t2", Body("ran"), CODEC) == "ran"


def test_an_unencodable_result_is_one_failure_for_every_delivery(guard: Guard) -> None:
    c = call()
    with pytest.raises(TaskFailedError) as original:
        guard.run(FAST, c, "t1", lambda: object(), CODEC)
    with pytest.raises(TaskFailedError) as later:
        guard.run(FAST, c, "t2", lambda: pytest.fail("a failed key must not run again"), CODEC)
    assert str(original.value) == str(later.value)
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.FAILED


def test_a_follower_waits_for_its_predecessor_whatever_on_running_says(guard: Guard) -> None:
    c = call()
    holder = _hold(guard, c)
    dropping = FAST.with_options({"on_running": "drop", "wait_timeout": 5}, source="t")
    with pytest.raises(Dropped):  # a duplicate is dropped
        guard.begin(dropping, c, "t2")

    def release_later() -> None:
        time.sleep(0.3)
        guard.fail(holder, RuntimeError("retry"))

    threading.Thread(target=release_later).start()
    follower = guard.begin(dropping, c, "t1", follows=holder.attempt_id)
    assert isinstance(follower, Attempt) and follower.token > holder.token


def test_a_handed_over_attempt_is_resumed_by_its_message(guard: Guard) -> None:
    c = call()
    first = guard.delivery(FAST, c, "t1", CODEC)

    def replaced() -> None:
        first.hand_over()
        raise RuntimeError("replaced")

    with pytest.raises(RuntimeError):
        first.run(replaced)
    record = guard.store.inspect(c.key)
    assert record is not None and record.state is State.RUNNING  # not given back
    attempt = first.attempt
    assert attempt is not None
    resumed = guard.delivery(FAST, c, "t1", CODEC, resumes=(attempt.attempt_id, attempt.token))
    assert resumed.run(lambda: "from the replacement") == "from the replacement"
    again = guard.delivery(FAST, c, "t1", CODEC, resumes=(attempt.attempt_id, attempt.token))
    assert again.run(lambda: pytest.fail("done")) == "from the replacement"  # begin replays
