"""``idemtask.step`` under the guard, over both stores (Redis: a real redis-server)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import idemtask
from idemtask.codecs import JsonCodec
from idemtask.errors import LeaseLostError
from idemtask.guard import Attempt, Call, Guard
from idemtask.policy import Policy
from idemtask.store import MemoryStore, RedisStore, State, Store

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


def new_call() -> Call:
    return Call("shop.checkout", uuid.uuid4().hex, "fp")


class Effects:
    """Side effects the body performs, counted per name."""

    def __init__(self) -> None:
        self.done: Counter[str] = Counter()

    def effect(self, name: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            self.done[name] += 1
            return {"step": name, "n": self.done[name]}

        return run


def begin(guard: Guard, call: Call, policy: Policy = FAST) -> Attempt:
    attempt = guard.begin(policy, call, uuid.uuid4().hex)
    assert isinstance(attempt, Attempt)
    return attempt


def crashed_attempt(guard: Guard, call: Call, effects: Effects, names: list[str]) -> Attempt:
    """An attempt that ran these steps, then died: it never reported and stopped renewing."""
    attempt = begin(guard, call)
    with guard.holding(attempt, CODEC):
        for name in names:
            idemtask.step(name, effects.effect(name))
    return attempt


def test_a_takeover_replays_recorded_steps_and_runs_only_the_rest(
    guard: Guard, store: Store
) -> None:
    call, effects = new_call(), Effects()
    crashed_attempt(guard, call, effects, ["reserve", "charge"])
    time.sleep(FAST.lease + 0.1)  # the dead attempt's lease ends
    attempt = begin(guard, call)
    assert attempt.takeover
    with guard.holding(attempt, CODEC):
        values = [idemtask.step(n, effects.effect(n)) for n in ("reserve", "charge", "write")]
    assert guard.succeed(attempt, values, CODEC) == values
    assert effects.done == {"reserve": 1, "charge": 1, "write": 1}
    assert values[0] == {"step": "reserve", "n": 1}  # the recorded value, not a rerun
    record = store.inspect(call.key)
    assert record is not None and record.state is State.DONE
    assert sorted(record.steps) == ["charge", "reserve", "write"]
    assert CODEC.decode(record.steps["charge"]) == {"step": "charge", "n": 1}


def test_a_retry_after_the_body_raised_replays_the_steps(guard: Guard) -> None:
    call, effects = new_call(), Effects()

    def body(fail: bool) -> str:
        idemtask.step("reserve", effects.effect("reserve"))
        if fail:
            raise ConnectionError("the card provider is down")
        idemtask.step("charge", effects.effect("charge"))
        return "ok"

    with pytest.raises(ConnectionError):
        guard.run(FAST, call, "t1", lambda: body(True), CODEC)
    assert guard.run(FAST, call, "t1", lambda: body(False), CODEC) == "ok"
    assert effects.done == {"reserve": 1, "charge": 1}


def test_a_step_that_raised_records_nothing_and_may_run_again(guard: Guard) -> None:
    call, tries = new_call(), []

    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise TimeoutError("try again")
        return "charged"

    def body() -> str:
        for _ in range(3):
            try:
                return idemtask.step("charge", flaky)
            except TimeoutError:
                continue
        raise AssertionError("unreachable")

    assert guard.run(FAST, call, "t1", body, CODEC) == "charged"
    assert len(tries) == 3


def test_a_duplicate_step_name_raises_before_running(guard: Guard, store: Store) -> None:
    call, effects = new_call(), Effects()

    def body() -> None:
        idemtask.step("charge", effects.effect("charge"))
        idemtask.step("charge", effects.effect("charge-again"))

    with pytest.raises(idemtask.DuplicateStepError, match="'charge' already ran"):
        guard.run(FAST, call, "t1", body, CODEC)
    assert effects.done == {"charge": 1}
    record = store.inspect(call.key)
    assert record is not None and record.state is State.IDLE and list(record.steps) == ["charge"]


def test_outside_a_guarded_body_a_step_simply_runs() -> None:
    effects = Effects()
    assert idemtask.step("a", effects.effect("a")) == {"step": "a", "n": 1}
    assert idemtask.step("a", effects.effect("a")) == {"step": "a", "n": 2}  # nothing records
    with idemtask.step("b") as s:
        assert not s.replayed
        s.value = 5
    assert s.value == 5


def test_an_unguarded_attempt_runs_its_steps_plainly(store: Store) -> None:
    guard = Guard(store)
    attempt = Attempt(new_call(), FAST, "t1", "a1", 0, False, guarded=False)
    effects = Effects()
    with guard.holding(attempt, CODEC):
        idemtask.step("a", effects.effect("a"))
        idemtask.step("a", effects.effect("a"))
    assert effects.done == {"a": 2}


def test_a_stale_holder_stops_at_its_next_step(guard: Guard, store: Store) -> None:
    call, effects = new_call(), Effects()
    stale = begin(guard, call)
    with guard.holding(stale, CODEC) as execution:
        idemtask.step("reserve", effects.effect("reserve"))
        guard.leases.drop(stale.attempt_id)  # frozen: nothing renews its lease any more
        time.sleep(FAST.lease + 0.1)
        successor = begin(Guard(store), call)
        assert successor.takeover
        with pytest.raises(LeaseLostError, match="taken over"):
            idemtask.step("charge", effects.effect("charge"))  # ran, but is not recorded
        assert execution.lease_lost
        with pytest.raises(LeaseLostError):
            idemtask.step("ship", effects.effect("ship"))  # stops before the effect
    assert effects.done == {"reserve": 1, "charge": 1}
    record = store.inspect(call.key)
    assert record is not None and list(record.steps) == ["reserve"]


def test_the_context_manager_form_tells_the_block_it_was_replayed(guard: Guard) -> None:
    call, effects = new_call(), Effects()
    first = begin(guard, call)
    with guard.holding(first, CODEC), idemtask.step("reserve") as s:
        assert not s.replayed
        s.value = effects.effect("reserve")()
    time.sleep(FAST.lease + 0.1)
    second = begin(guard, call)
    with guard.holding(second, CODEC), idemtask.step("reserve") as again:
        assert again.replayed
        if not again.replayed:
            again.value = effects.effect("reserve")()
    assert again.value == {"step": "reserve", "n": 1}
    assert effects.done == {"reserve": 1}


def test_the_decorator_form_runs_the_function_as_the_step(guard: Guard) -> None:
    call, charges = new_call(), Counter[str]()

    @idemtask.step("charge-card")
    def charge_card(order_id: str, *, amount: int) -> str:
        charges[order_id] += amount
        return f"ch_{order_id}"

    first = begin(guard, call)
    with guard.holding(first, CODEC):
        assert charge_card("o1", amount=5) == "ch_o1"
    time.sleep(FAST.lease + 0.1)
    second = begin(guard, call)
    with guard.holding(second, CODEC):
        assert charge_card("o1", amount=5) == "ch_o1"
        with pytest.raises(idemtask.DuplicateStepError):
            charge_card("o1", amount=5)
    assert charges == {"o1": 5}
    assert idemtask.step("x", charge_card, "o2", amount=1) == "ch_o2"  # unguarded: plain call


def test_a_step_returns_its_value_as_the_codec_replays_it(guard: Guard) -> None:
    call = new_call()
    with guard.holding(begin(guard, call), CODEC):
        assert idemtask.step("pair", lambda: (1, 2)) == [1, 2]  # the same on every attempt


def test_an_unencodable_step_value_raises_and_records_nothing(guard: Guard, store: Store) -> None:
    call = new_call()
    attempt = begin(guard, call)
    with guard.holding(attempt, CODEC):
        with pytest.raises(idemtask.StepValueError, match=r"'receipt'.*cannot be recorded"):
            idemtask.step("receipt", object)
        small = Policy(lease=0.3, max_result_bytes=10)
        big = begin(guard, new_call(), small)
    with guard.holding(big, CODEC), pytest.raises(idemtask.StepValueError, match="over"):
        idemtask.step("blob", lambda: "x" * 100)
    record = store.inspect(call.key)
    assert record is not None and not record.steps


def test_a_step_name_must_be_a_short_string() -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        idemtask.step("")
    with pytest.raises(ValueError, match="non-empty string"):
        idemtask.step("x" * 201)


def _evalsha_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_one_round_trip_per_step_and_one_read_per_later_attempt(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    guard = Guard(store)
    policy = Policy(lease=30, result_ttl=60)
    call, counter = new_call(), redis.Redis.from_url(redis_url)
    first = begin(guard, call, policy)
    before = _evalsha_calls(counter)
    with guard.holding(first, CODEC):
        pass  # no steps: nothing is sent
    assert _evalsha_calls(counter) - before == 0
    with guard.holding(first, CODEC):
        idemtask.step("a", lambda: 1)
        idemtask.step("b", lambda: 2)
    assert _evalsha_calls(counter) - before == 2  # token 1: nothing to read, one write each
    guard.fail(first, ConnectionError("retry"))
    retry = begin(guard, call, policy)
    before = _evalsha_calls(counter)
    with guard.holding(retry, CODEC):
        idemtask.step("a", lambda: 1)
        idemtask.step("b", lambda: 2)
        idemtask.step("c", lambda: 3)
    assert _evalsha_calls(counter) - before == 2  # one read, then one write for "c"
    counter.close()


def test_inspect_shows_the_steps_and_forget_removes_them(redis_url: str) -> None:
    from click.testing import CliRunner

    from idemtask.cli import main

    store = RedisStore.from_url(redis_url)
    guard, call = Guard(store), new_call()
    with guard.holding(begin(guard, call), CODEC):
        idemtask.step("charge-card", lambda: {"charge": "ch_1"})
    out = CliRunner().invoke(main, ["--redis", redis_url, "inspect", call.key]).output
    assert 'step:         charge-card = {"charge":"ch_1"} (17 bytes)' in out
    as_json = CliRunner().invoke(main, ["--redis", redis_url, "inspect", call.key, "--json"])
    assert '"charge-card": "{\\"charge\\":\\"ch_1\\"}"' in as_json.output
    assert store.forget(call.key)
    assert store.client.keys("*") == []  # the steps lived in the record and went with it


def test_a_step_whose_record_never_lands_raises_store_unavailable(
    fresh_redis: Callable[..., Any],
) -> None:
    """The effect happened but is not recorded: the body stops there, so at most this one
    step can run again, and the name is free for the retry."""
    server = fresh_redis(appendonly=True)  # the record survives the restart
    store = RedisStore.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    guard, call, effects = Guard(store), new_call(), Effects()
    attempt = begin(guard, call)
    with guard.holding(attempt, CODEC):
        idemtask.step("reserve", effects.effect("reserve"))
        server.stop()
        with pytest.raises(idemtask.StoreUnavailable, match=r"'charge' of key .* not be recorded"):
            idemtask.step("charge", effects.effect("charge"))
    server.start()  # the body stopped there; its lease ends
    time.sleep(FAST.lease + 0.1)
    successor = begin(Guard(store), call)
    with guard.holding(successor, CODEC):
        assert idemtask.step("reserve", effects.effect("reserve")) == {"step": "reserve", "n": 1}
        idemtask.step("charge", effects.effect("charge"))
    assert effects.done == {"reserve": 1, "charge": 2}  # only the unrecorded step repeated


def test_steps_work_under_the_least_privilege_acl(fresh_redis: Callable[..., Any]) -> None:
    """The step scripts call nothing the store user's ACL (``idemtask.store.acl``) denies."""
    from idemtask.store.acl import acl_rules

    server = fresh_redis()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "steps", "on", ">steps-pw", *acl_rules().split())
    admin.close()
    store = RedisStore.from_url(f"redis://steps:steps-pw@127.0.0.1:{server.port}/0")
    guard, call, effects = Guard(store), new_call(), Effects()
    crashed_attempt(guard, call, effects, ["reserve"])
    time.sleep(FAST.lease + 0.1)
    with guard.holding(begin(guard, call), CODEC):  # token 2: reads the recorded steps
        idemtask.step("reserve", effects.effect("reserve"))
        idemtask.step("charge", effects.effect("charge"))
    assert effects.done == {"reserve": 1, "charge": 1}
    store.client.close()
