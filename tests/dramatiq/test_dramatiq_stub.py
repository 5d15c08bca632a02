"""The middleware on a StubBroker and an in-process Worker, with a real Redis store."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import dramatiq
import pytest
from dramatiq import group, pipeline
from dramatiq.results import ResultFailure, ResultMissing

import idemtask
from idemtask import ConfigurationError, KeyDerivationError
from idemtask.dramatiq import IdempotencyMiddleware, InvalidActorOptions
from idemtask.dramatiq.middleware import DEFERRALS_OPTION, FINGERPRINT_OPTION, KEY_OPTION
from idemtask.errors import AlreadyRunningError, IdempotencyConflict, TaskFailedError
from idemtask.guard import Call, Guard, busy_delay
from idemtask.keys import bind_arguments, derive_key
from idemtask.store.base import Acquired, State

pytestmark = pytest.mark.dramatiq

FAST_RETRIES = {"min_backoff": 10, "max_backoff": 50}


def test_duplicate_send_returns_original_and_runs_once(stub_env, counters, decisions) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True)
    def add(x: int, y: int = 2) -> int:
        counters.hit("add")
        return x + y

    env.start()
    first = add.send(1)
    second = add.send(1, 2)  # same call once defaults are applied
    third = add.send_with_options(kwargs={"x": 1, "y": 2})
    assert second.message_id == first.message_id == third.message_id
    env.join()
    assert counters.get("add") == 1
    assert first.get_result(block=True, timeout=5000) == 3
    assert third.get_result(block=True, timeout=5000) == 3
    # once done, a duplicate still hands back the original and its result
    late = add.send(x=1)
    assert late.message_id == first.message_id
    assert late.get_result(block=True, timeout=5000) == 3
    other = add.send(2)
    assert other.message_id != first.message_id
    env.join()
    assert counters.get("add") == 2
    assert decisions.count("duplicate") == 3
    assert decisions.count("completed") == 2


def test_result_refilled_when_backend_forgot_it(stub_env, counters) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True)
    def square(x: int) -> int:
        counters.hit("square")
        return x * x

    env.start()
    first = square.send(7)
    env.join()
    assert first.get_result(block=True, timeout=5000) == 49
    env.broker.get_results_backend().results.clear()  # Dramatiq's result TTL ran out
    again = square.send(7)
    assert again.message_id == first.message_id
    assert again.get_result() == 49
    assert counters.get("square") == 1


def test_explicit_key_per_send(stub_env, counters) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True)
    def pay(order: str, amount: int) -> str:
        counters.hit("pay")
        return f"{order}:{amount}"

    env.start()
    a = pay.send_with_options(args=("o1", 5), idempotency_key="order-1")
    b = pay.send_with_options(args=("o1", 5), idempotency_key="order-1")
    c = pay.send_with_options(args=("o1", 5), idempotency_key="order-2")
    assert a.message_id == b.message_id != c.message_id
    assert "idempotency_key" not in a.options and a.options[KEY_OPTION]
    with pytest.raises(IdempotencyConflict):  # same key, different payload
        pay.send_with_options(args=("o1", 6), idempotency_key="order-1")
    env.join()
    assert counters.get("pay") == 2
    assert b.get_result(block=True, timeout=5000) == "o1:5"


def test_key_spec_subset_and_callable(stub_env, counters) -> None:
    env = stub_env(validate_payload=False)

    @dramatiq.actor(idempotent=True, idempotency_key=("order_id",))
    def charge(order_id: int, note: str) -> None:
        counters.hit("charge")

    @dramatiq.actor(idempotent=True, idempotency_key=lambda user, **_: user.lower())
    def welcome(user: str, locale: str = "en") -> None:
        counters.hit("welcome")

    env.start()
    assert charge.send(1, "a").message_id == charge.send(1, "b").message_id
    assert welcome.send("Ann").message_id == welcome.send("ANN", locale="fr").message_id
    env.join()
    assert (counters.get("charge"), counters.get("welcome")) == (1, 1)


@pytest.mark.parametrize("delay", [200, timedelta(milliseconds=200)], ids=str)
def test_delayed_send_is_not_its_own_duplicate(stub_env, counters, delay: Any) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True)
    def later(x: int) -> int:
        counters.hit("later")
        return x

    env.start()
    message = later.send_with_options(args=(5,), delay=delay)
    assert later.send(5).message_id == message.message_id
    env.join()
    assert counters.get("later") == 1
    assert message.get_result(block=True, timeout=5000) == 5


def test_redelivered_copy_of_completed_message_replays(stub_env, counters, decisions) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True)
    def once(x: int) -> dict[str, Any]:
        counters.hit("once")
        return {"x": x, "items": (1, 2)}

    env.start()
    message = once.send(3)
    env.join()
    first = message.get_result(block=True, timeout=5000)
    env.broker.get_results_backend().results.clear()
    env.broker.enqueue(message)  # the broker delivers the same message again
    env.join()
    assert counters.get("once") == 1
    assert decisions.count("replayed") == 1
    assert message.get_result(block=True, timeout=5000) == first == {"x": 3, "items": [1, 2]}


def test_pipeline_and_group_complete_through_a_replay(stub_env, counters) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True)
    def add(x: int, y: int) -> int:
        counters.hit(f"add-{x}-{y}")
        return x + y

    @dramatiq.actor(store_results=True)
    def double(x: int) -> int:
        return 2 * x

    @dramatiq.actor
    def finished() -> None:
        counters.hit("finished")

    env.start()
    add.send(1, 2)
    env.join()
    pipe = pipeline([add.message(1, 2), double.message()]).run()
    env.join()
    assert pipe.get_result(block=True, timeout=5000) == 6
    g = group([add.message(1, 2), add.message(3, 4)])
    g.add_completion_callback(finished.message())
    g.run()
    env.join()
    assert sorted(g.get_results(block=True, timeout=5000)) == [3, 7]
    assert counters.get("finished") == 1
    assert counters.get("add-1-2") == 1  # the pipeline and the group replayed it
    assert counters.get("add-3-4") == 1


def test_retries_reenter_without_double_execution(stub_env, counters, decisions) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=3, **FAST_RETRIES)
    def flaky(x: int) -> int:
        if counters.hit("flaky") == 1:
            raise ConnectionError("downstream blip")
        return x * 10

    env.start()
    message = flaky.send(4)
    env.join()
    assert message.get_result(block=True, timeout=5000) == 40
    assert counters.get("flaky") == 2
    assert decisions.count("released") == 1
    assert decisions.count("completed") == 1
    record = env.middleware.guard.store.inspect(message.options[KEY_OPTION])
    assert record is not None and record.state is State.DONE and record.token == 2
    env.broker.enqueue(message)  # a stray copy after success replays
    env.join()
    assert counters.get("flaky") == 2


def test_terminal_exception_is_replayed_without_retries(stub_env, counters) -> None:
    env = stub_env(terminal_exceptions=(LookupError,))

    @dramatiq.actor
    def failed(message: dict[str, Any], error: dict[str, str]) -> None:
        counters.hit(f"failed:{error['type']}")

    @dramatiq.actor(
        idempotent=True, store_results=True, max_retries=5, on_failure="failed", **FAST_RETRIES
    )
    def lookup(x: int) -> int:
        counters.hit("lookup")
        raise KeyError(x)

    env.start()
    message = lookup.send(1)
    env.join()
    with pytest.raises(ResultFailure, match="KeyError"):
        message.get_result(block=True, timeout=5000)
    assert counters.get("lookup") == 1  # a terminal exception is not retried...
    assert len(env.broker.dead_letters) == 1
    env.broker.enqueue(message)
    env.join()
    assert counters.get("lookup") == 1  # ...and a redelivery replays the failure
    assert len(env.broker.dead_letters) == 2  # at once, without retries
    last = env.broker.dead_letters[-1]
    assert last.message_id == message.message_id
    assert isinstance(last._exception, TaskFailedError)
    assert "throws" not in last.options  # restored, so on_failure could encode the message
    assert (counters.get("failed:KeyError"), counters.get("failed:TaskFailedError")) == (1, 1)


def test_an_oversized_result_is_one_failure_for_every_handle(stub_env, counters) -> None:
    """Results never gets a value a redelivery could not replay, nor a silent ``None``: the
    original, a redelivered copy and a duplicate all fail with the same stated reason."""
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=3, max_result_bytes=64)
    def report(name: str) -> str:
        counters.hit("report")
        return "x" * 1000

    env.start()
    message = report.send("q3")
    env.join()
    with pytest.raises(ResultFailure) as original:
        message.get_result(block=True, timeout=5000)
    assert "result not stored (1002 bytes > max_result_bytes=64)" in str(original.value)
    env.broker.enqueue(message)  # a redelivered copy replays the same failure, unretried
    env.join()
    dead = env.broker.dead_letters
    assert [m.message_id for m in dead] == [message.message_id] * 2
    assert all(isinstance(m._exception, TaskFailedError) for m in dead)
    assert str(dead[0]._exception) == str(dead[1]._exception)
    assert report.send("q3").message_id == message.message_id
    assert counters.get("report") == 1


def test_busy_key_defers_same_message_without_spending_retries(
    stub_env, counters, decisions
) -> None:
    env = stub_env(worker_threads=2, lease=2, on_duplicate="enqueue")

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=0)
    def slow(x: int) -> int:
        counters.hit("slow")
        time.sleep(0.6)
        return x

    env.start()
    first = slow.send(1)
    time.sleep(0.1)
    second = slow.send(1)  # on_duplicate="enqueue": a second message with the same key
    assert second.message_id != first.message_id
    env.join()
    assert counters.get("slow") == 1
    assert decisions.count("deferred") >= 1
    assert decisions.count("replayed") == 1
    # the set-aside copy stored no None: the replay stored the real value under its id
    assert second.get_result(block=True, timeout=5000) == 1
    assert first.get_result(block=True, timeout=5000) == 1
    assert not env.broker.dead_letters


def _held_elsewhere(env: Any, message: Any) -> tuple[Guard, Any]:
    """Stamp ``message`` and let another attempt hold its key; returns that attempt."""
    env.middleware.before_enqueue(env.broker, message, None)
    policy = env.middleware.policy_for(message.actor_name)
    assert policy is not None
    call = Call(
        message.actor_name, message.options[KEY_OPTION], message.options[FINGERPRINT_OPTION]
    )
    guard: Guard = env.middleware.guard
    return guard, guard.begin(policy, call, "someone-else")


def test_deferred_copies_keep_id_and_retries_and_grow_their_delay(stub_env, counters) -> None:
    env = stub_env(worker_threads=1, lease=5)

    @dramatiq.actor(idempotent=True, store_results=True)
    def job(x: int) -> int:
        counters.hit("job")
        return x

    env.start()
    message = job.message(9)
    guard, holder = _held_elsewhere(env, message)
    enqueued: list[Any] = []
    original_enqueue = env.broker.enqueue

    def spy(msg: Any, *, delay: int | None = None) -> Any:
        if delay is not None:  # a deferral (the worker moves it on when due, undelayed)
            enqueued.append((msg, delay))
        return original_enqueue(msg, delay=delay)

    env.broker.enqueue = spy  # type: ignore[method-assign]
    retried = message.copy(options={"retries": 2})
    env.broker.enqueue(retried)
    wait = time.monotonic() + 5
    while len(enqueued) < 4 and time.monotonic() < wait:
        time.sleep(0.02)
    copies = enqueued[:4]
    assert [m.message_id for m, _ in copies] == [message.message_id] * 4
    assert [m.options["retries"] for m, _ in copies] == [2] * 4
    # Each copy carries its count, and its delay is the next step of the schedule.
    assert [m.options[DEFERRALS_OPTION] for m, _ in copies] == [1, 2, 3, 4]
    assert [delay for _, delay in copies] == [int(busy_delay(n, 5) * 1000) for n in range(4)]
    assert [delay for _, delay in copies] == [50, 100, 200, 250]
    assert counters.get("job") == 0
    with pytest.raises(ResultMissing):  # the set-aside copy stored no (None) result
        message.get_result()
    guard.succeed(holder, 9, env.middleware.codec)  # type: ignore[arg-type]
    env.join()
    assert message.get_result(block=True, timeout=5000) == 9
    assert counters.get("job") == 0  # the deferred copy replayed the holder's value


@pytest.mark.parametrize("policy", ["drop", "raise", "wait"])
def test_busy_key_drop_raise_and_wait(stub_env, counters, decisions, policy: str) -> None:
    env = stub_env(worker_threads=2, lease=5, on_duplicate="enqueue", on_running=policy)

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=0)
    def slow(x: int) -> int:
        counters.hit("slow")
        time.sleep(0.5)
        return x

    env.start()
    slow.send(1)
    time.sleep(0.1)
    second = slow.send(1)
    env.join()
    assert counters.get("slow") == 1
    if policy == "drop":
        assert decisions.count("dropped") == 1
        assert not env.broker.dead_letters
    elif policy == "wait":  # waited for the holder, then replayed its value
        assert second.get_result(block=True, timeout=5000) == 1
        assert decisions.count("replayed") == 1
        assert decisions.count("deferred") == 0
    else:
        with pytest.raises(ResultFailure, match="AlreadyRunningError"):
            second.get_result(block=True, timeout=5000)
        assert isinstance(env.broker.dead_letters[-1]._exception, AlreadyRunningError)


def test_unkeyable_arguments_refused_at_send(stub_env, counters) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True)
    def take(x: Any) -> None:
        counters.hit("take")

    env.start()
    with pytest.raises(KeyDerivationError) as refused:
        take.send(object())
    # The path is said once, as for a Celery call (Dramatiq's error carries it too).
    assert str(refused.value) == (
        "x: cannot encode value of type object; pass a JSON-like value or set idempotency_key"
    )
    assert refused.value.path == "x"
    with pytest.raises(KeyDerivationError, match="nan"):
        take.send({"a": [1, float("nan")]})
    with pytest.raises(KeyDerivationError):  # through before_enqueue (a group child)
        group([take.message(object())]).run()
    assert env.broker.queues["default"].qsize() == 0
    env.join()
    assert counters.get("take") == 0


def test_async_actor(stub_env, counters) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True)
    async def fetch(x: int) -> dict[str, int]:
        await asyncio.sleep(0.01)
        counters.hit("fetch")
        return {"x": x, "token": idemtask.current().fencing_token}

    env.start()
    message = fetch.send(2)
    assert fetch.send(2).message_id == message.message_id
    env.join()
    assert message.get_result(block=True, timeout=5000) == {"x": 2, "token": 1}
    env.broker.enqueue(message)
    env.join()
    assert counters.get("fetch") == 1


def test_actors_without_idempotent_are_untouched(stub_env, counters) -> None:
    env = stub_env()

    def plain_fn(x: int) -> None:
        counters.hit("plain")

    plain = dramatiq.actor(plain_fn)
    env.start()
    assert plain.fn is plain_fn
    assert plain.send(1).message_id != plain.send(1).message_id
    env.join()
    assert counters.get("plain") == 2
    assert env.middleware.policy_for("plain_fn") is None


def test_default_idempotent_setting(stub_env, counters) -> None:
    env = stub_env(idempotent=True)

    @dramatiq.actor
    def guarded(x: int) -> None:
        counters.hit("guarded")

    @dramatiq.actor(idempotent=False)
    def opted_out(x: int) -> None:
        counters.hit("opted_out")

    env.start()
    assert guarded.send(1).message_id == guarded.send(1).message_id
    assert opted_out.send(1).message_id != opted_out.send(1).message_id
    env.join()
    assert (counters.get("guarded"), counters.get("opted_out")) == (1, 2)


def test_result_ttl_stays_dramatiqs_own_option(stub_env) -> None:
    """Results reads ``result_ttl`` in ms; idemtask's seconds go by another actor option."""
    env = stub_env(result_ttl=7200)

    @dramatiq.actor(idempotent=True, result_ttl=500)
    def dramatiq_ttl_only(x: int) -> None: ...

    @dramatiq.actor(idempotent=True, idempotency_result_ttl=3600, result_ttl=500)
    def both(x: int) -> None: ...

    first, second = (env.middleware.policy_for(n) for n in ("dramatiq_ttl_only", "both"))
    assert first is not None and first.result_ttl == 7200  # the middleware default
    assert second is not None and second.result_ttl == 3600


def test_bad_options_fail_at_declaration(stub_env) -> None:
    stub_env()
    with pytest.raises(ConfigurationError, match="on_running"):

        @dramatiq.actor(idempotent=True, on_running="later")
        def a(x: int) -> None: ...

    with pytest.raises(InvalidActorOptions, match="'order'"):

        @dramatiq.actor(idempotent=True, idempotency_key=("order",))
        def b(order_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match="lease"):

        @dramatiq.actor(idempotent=True, lease=-1)
        def c() -> None: ...

    with pytest.raises(ConfigurationError, match="unknown idemtask setting"):
        IdempotencyMiddleware(leese=3)


def test_actor_declared_before_middleware_is_wrapped(redis_url, counters) -> None:
    from dramatiq.brokers.stub import StubBroker
    from dramatiq.middleware import Retries

    broker = StubBroker()
    dramatiq.set_broker(broker)
    broker.actor_options |= {"idempotent"}  # declared before the middleware existed

    @dramatiq.actor(idempotent=True)
    def early(x: int) -> None:
        counters.hit("early")

    broker.add_middleware(IdempotencyMiddleware(redis_url=redis_url), before=Retries)
    worker = dramatiq.Worker(broker, worker_timeout=50)
    worker.start()
    try:
        assert early.send(1).message_id == early.send(1).message_id
        broker.join("default")
        worker.join()
        assert counters.get("early") == 1
    finally:
        worker.stop()


def test_same_key_space_as_celery(stub_env) -> None:
    env = stub_env()

    def charge(order_id: int, amount: float, currency: str = "EUR") -> None: ...

    actor = dramatiq.actor(charge, actor_name="shop.charge", idempotent=True)
    message = actor.message(7, amount=12.5)
    env.middleware.before_enqueue(env.broker, message, None)
    # what the Celery adapter computes for a task named "shop.charge" with the same call
    celery_side = derive_key(
        "shop.charge", bind_arguments(charge, (7,), {"amount": 12.5}, task_name="shop.charge")
    )
    assert message.options[KEY_OPTION] == celery_side.key
    assert message.options[FINGERPRINT_OPTION] == celery_side.fingerprint
    assert env.middleware.derive("shop.charge", [7, 12.5, "EUR"], {}).key == celery_side.key


def test_memory_store_smoke(stub_env, counters) -> None:
    env = stub_env(store_url="memory://")

    @dramatiq.actor(idempotent=True, store_results=True)
    def mem(x: int) -> int:
        counters.hit("mem")
        return x + 1

    env.start()
    message = mem.send(1)
    assert mem.send(1).message_id == message.message_id
    env.join()
    env.broker.enqueue(message)
    env.join()
    assert counters.get("mem") == 1
    assert message.get_result(block=True, timeout=5000) == 2


def test_message_from_another_producer_is_keyed_at_the_worker(stub_env, counters) -> None:
    env = stub_env()

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=3, **FAST_RETRIES)
    def ingest(x: Any) -> Any:
        counters.hit("ingest")
        return x

    env.start()
    sent = ingest.send(1)
    env.join()
    # published straight onto the queue, without idemtask's options (another producer)
    foreign = ingest.message(1)
    env.broker.queues["default"].put(foreign.encode())
    unkeyable = ingest.message(float("nan"))
    env.broker.queues["default"].put(unkeyable.encode())
    env.join()
    assert counters.get("ingest") == 1  # the foreign copy got the same key and replayed
    assert foreign.get_result(block=True, timeout=5000) == sent.get_result() == 1
    dead = env.broker.dead_letters
    assert [m.message_id for m in dead] == [unkeyable.message_id]  # failed at once, no retries
    assert isinstance(dead[0]._exception, KeyDerivationError)


def test_deferral_refused_by_the_broker_is_retried_not_lost(stub_env, counters) -> None:
    """The broker refuses the deferred copy: the delivery fails with the ``Deferred`` (its
    cause the broker's error), Retries enqueues it again, and it replays the holder's value."""
    env = stub_env(worker_threads=1, lease=5)

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=3, **FAST_RETRIES)
    def job(x: int) -> int:
        counters.hit("job")
        return x

    env.start()
    message = job.message(9)
    guard, holder = _held_elsewhere(env, message)
    refused: list[Any] = []
    enqueued: list[Any] = []
    original_enqueue = env.broker.enqueue

    def refuse_first_deferral(msg: Any, *, delay: int | None = None) -> Any:
        if DEFERRALS_OPTION in msg.options and not refused:
            refused.append(msg)
            raise dramatiq.errors.ConnectionClosed(OSError("broker went away"))
        enqueued.append(msg)
        return original_enqueue(msg, delay=delay)

    env.broker.enqueue = refuse_first_deferral  # type: ignore[method-assign]
    env.broker.enqueue(message)
    wait = time.monotonic() + 5
    while not refused and time.monotonic() < wait:
        time.sleep(0.02)
    assert refused and refused[0].message_id == message.message_id
    guard.succeed(holder, 9, env.middleware.codec)  # type: ignore[arg-type]
    env.join()
    assert message.get_result(block=True, timeout=5000) == 9
    assert counters.get("job") == 0
    assert not env.broker.dead_letters
    assert [m.options.get("retries") for m in enqueued][:2] == [None, 1]  # Retries kept it


def test_a_step_that_finds_its_key_taken_over_gets_the_new_holders_result(
    stub_env, counters, decisions
) -> None:
    """Another attempt took the key over while this body ran (its worker froze past the
    lease) and completed it; this body's next step finds that out. Its message is neither
    failed nor dead-lettered as ``LeaseLostError`` (``max_retries=0``): as on Celery, it is
    deferred and its handle gets the value the key recorded."""
    env = stub_env()
    store, codec = env.middleware.guard.store, env.middleware.codec

    @dramatiq.actor(idempotent=True, store_results=True, max_retries=0, lease=1)
    def settle(order: str) -> str:
        counters.hit("runs")
        idemtask.step("reserve", lambda: "reserved")
        derived = env.middleware.derive("settle", (order,), {})
        store.forget(derived.key)  # what a takeover after the lease ended leaves behind
        taken = store.acquire(
            derived.key,
            task_id="other",
            attempt_id="other-attempt",
            task_name="settle",
            fingerprint=derived.fingerprint,
            lease_ms=10_000,
            max_deliveries=5,
            ttl_ms=60_000,
        )
        assert isinstance(taken, Acquired)
        store.complete(
            derived.key,
            attempt_id="other-attempt",
            token=taken.token,
            result=codec.encode("settled by the other"),
            result_ttl_ms=60_000,
        )
        idemtask.step("charge", lambda: "charged")
        return "settled by this one"

    env.start()
    message = settle.send("o-7")
    assert message.get_result(block=True, timeout=20_000) == "settled by the other"
    assert counters.get("runs") == 1
    assert decisions.count("replayed") >= 1
    assert env.broker.dead_letters == []
