"""Enqueue side: duplicates get the original's handle, keys are derived once and carried in
the message, nothing is published for a call whose key cannot be derived."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import redis
from celery import Celery
from celery_support import Urls, running_worker

from idemtask.celery import FINGERPRINT_HEADER, KEY_HEADER
from idemtask.errors import (
    ConfigurationError,
    DuplicateTaskError,
    IdempotencyConflict,
    KeyDerivationError,
)
from idemtask.store.base import State

pytestmark = pytest.mark.celery


def queue_length(urls: Urls, queue: str = "celery") -> int:
    client = redis.Redis.from_url(urls.broker)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def test_duplicate_delay_returns_the_original_and_runs_once(
    make_app: Callable[..., Celery], counter: redis.Redis, urls: Urls
) -> None:
    app = make_app()
    record = app.tasks["t.record"]
    first = record.delay("a")
    second = record.delay("a")
    third = record.apply_async(kwargs={"token": "a", "sleep": 0.0})  # same call, bound
    assert second.id == first.id
    assert third.id == first.id
    assert queue_length(urls) == 1
    with running_worker(app):
        assert first.get(timeout=20) == {"token": "a", "done": 1}
        # Once done, a new duplicate still points at the original, whose result is stored.
        after = record.delay("a")
        assert after.id == first.id
        assert after.get(timeout=20) == {"token": "a", "done": 1}
    assert int(counter.get("runs:a")) == 1


def test_explicit_keys_choose_the_identity(
    make_app: Callable[..., Celery], counter: redis.Redis, urls: Urls
) -> None:
    app = make_app(idemtask_conf={"validate_payload": False})
    record = app.tasks["t.record"]
    one = record.apply_async(("x",), idempotency_key="order-1")
    again = record.apply_async(("y",), idempotency_key="order-1")
    other = record.apply_async(("x",), idempotency_key="order-2")
    derived = record.apply_async(("x",))
    assert again.id == one.id
    assert len({one.id, other.id, derived.id}) == 3
    assert queue_length(urls) == 3
    with running_worker(app):
        assert one.get(timeout=20)["token"] == "x"
        assert again.get(timeout=20)["token"] == "x"
        other.get(timeout=20)
        derived.get(timeout=20)
    assert int(counter.get("runs:x")) == 3
    assert counter.get("runs:y") is None


def test_key_and_fingerprint_travel_in_the_headers(make_app: Callable[..., Celery]) -> None:
    app = make_app()
    record = app.tasks["t.record"]
    published: list[dict[str, object]] = []

    from celery.signals import before_task_publish

    def grab(headers: dict[str, object], **_: object) -> None:
        published.append(dict(headers))

    before_task_publish.connect(grab)
    try:
        record.delay("h")
        record.apply_async(("h2",), idempotency_key="explicit")
    finally:
        before_task_publish.disconnect(grab)
    expected = record.idemtask_key(("h",))
    assert published[0][KEY_HEADER] == expected.key
    assert published[0][FINGERPRINT_HEADER] == expected.fingerprint
    explicit = record.idemtask_key(("h2",), idempotency_key="explicit")
    assert published[1][KEY_HEADER] == explicit.key
    assert "idempotency_key" not in published[1]


def test_unkeyable_arguments_raise_and_publish_nothing(
    make_app: Callable[..., Celery], urls: Urls
) -> None:
    app = make_app(task_serializer="pickle", accept_content=["pickle", "json"])
    record = app.tasks["t.record"]
    with pytest.raises(KeyDerivationError, match="token"):
        record.delay(object())
    with pytest.raises(KeyDerivationError):
        record.delay(float("nan"))
    with pytest.raises(TypeError, match="positional arguments"):
        record.delay("a", "b", "c")  # Celery's own argument check comes first
    assert queue_length(urls) == 0


def test_explicit_key_without_payload_validation_needs_no_encodable_arguments(
    make_app: Callable[..., Celery], urls: Urls
) -> None:
    app = make_app(task_serializer="pickle", accept_content=["pickle", "json"])
    record = app.tasks["t.record"]
    with pytest.raises(KeyDerivationError):  # the fingerprint needs the arguments
        record.apply_async((object(),), idempotency_key="k-1")
    assert queue_length(urls) == 0
    lax = make_app(
        task_serializer="pickle",
        accept_content=["pickle", "json"],
        idemtask_conf={"validate_payload": False},
    )
    first = lax.tasks["t.record"].apply_async((object(),), idempotency_key="k-1")
    again = lax.tasks["t.record"].apply_async((object(),), idempotency_key="k-1")
    assert again.id == first.id
    assert queue_length(urls) == 1


def test_same_key_other_arguments_is_a_conflict(
    make_app: Callable[..., Celery], urls: Urls
) -> None:
    app = make_app()
    charge = app.tasks["t.charge"]
    charge.delay("o-1", 100)
    with pytest.raises(IdempotencyConflict):
        charge.delay("o-1", 250)
    with pytest.raises(IdempotencyConflict):
        app.tasks["t.record"].apply_async(("p",), idempotency_key="k")
        app.tasks["t.record"].apply_async(("q",), idempotency_key="k")
    assert queue_length(urls) == 2


def test_callable_key_needs_no_staticmethod(make_app: Callable[..., Celery]) -> None:
    app = make_app()
    task = app.tasks["t.by_customer"]
    first = task.delay("c-1", "hello")
    assert task.idemtask_key(("c-1", "other")).key == task.idemtask_key(("c-1", "x")).key
    with pytest.raises(IdempotencyConflict):
        task.delay("c-1", "other note")  # same key, other payload
    assert task.delay("c-2", "hello").id != first.id


def test_on_duplicate_raise_and_enqueue(make_app: Callable[..., Celery], urls: Urls) -> None:
    app = make_app(idemtask_conf={"on_duplicate": "raise"})
    record = app.tasks["t.record"]
    first = record.delay("r")
    with pytest.raises(DuplicateTaskError) as caught:
        record.delay("r")
    assert caught.value.existing_task_id == first.id

    app2 = make_app(idemtask_conf={"on_duplicate": "enqueue"})
    record2 = app2.tasks["t.record"]
    assert record2.delay("e").id != record2.delay("e").id
    assert queue_length(urls) == 3


def test_publish_failure_gives_the_reservation_back(make_app: Callable[..., Celery]) -> None:
    app = make_app(broker_url="redis://127.0.0.1:1/0", broker_connection_max_retries=0)
    app.conf.broker_transport_options = {"max_retries": 0}
    record = app.tasks["t.record"]
    with pytest.raises(Exception):  # noqa: B017 - kombu's OperationalError, whatever its class
        record.apply_async(("lost",), retry=False)
    key = record.idemtask_key(("lost",)).key
    stored = record._guard().store.inspect(key)
    assert stored is not None and stored.state is State.IDLE  # free for the next call
    working = make_app().tasks["t.record"]
    assert working.delay("lost").id != stored.task_id


def test_not_idempotent_is_a_plain_task(
    make_app: Callable[..., Celery], counter: redis.Redis, urls: Urls
) -> None:
    app = make_app()
    plain = app.tasks["t.plain"]
    assert plain.idemtask_policy() is None
    first, second = plain.delay("p"), plain.delay("p")
    assert first.id != second.id
    with pytest.raises(ConfigurationError):
        plain.apply_async(("p",), idempotency_key="k")
    with running_worker(app):
        assert sorted([first.get(timeout=20), second.get(timeout=20)]) == [1, 2]


def test_canvas_members_are_never_suppressed(
    make_app: Callable[..., Celery], counter: redis.Redis, urls: Urls
) -> None:
    from celery import group

    app = make_app()
    add = app.tasks["t.add"]
    original = add.delay(1, 1)
    members = group(add.s(1, 1), add.s(1, 1)).apply_async()
    ids = [member.id for member in members.results]
    assert original.id not in ids
    assert queue_length(urls) == 3  # the original and both members were published
    with running_worker(app):
        assert members.get(timeout=20) == [2, 2]
        assert original.get(timeout=20) == 2
    assert int(counter.get("runs:add:1:1")) == 1


def test_tuples_and_lists_key_alike_other_types_are_tagged(make_app: Callable[..., Celery]) -> None:
    app = make_app()
    record = app.tasks["t.record"]
    # The header carries the caller's key, so the worker never re-derives it from the
    # serialized form: tuples and lists key alike, other types are tagged.
    assert record.idemtask_key(((1, 2),)).key == record.idemtask_key(([1, 2],)).key
    assert record.idemtask_key((Decimal("1.0"),)).key != record.idemtask_key(("1.0",)).key


def test_a_countdown_extends_the_reservation(make_app: Callable[..., Celery], urls: Urls) -> None:
    """A message held back by a countdown keeps its key reserved past reservation_ttl."""
    app = make_app(idemtask_conf={"reservation_ttl": 1})
    record = app.tasks["t.record"]
    held = record.apply_async(("later",), countdown=30)
    plain = record.apply_async(("now",))
    time.sleep(1.3)  # past reservation_ttl
    assert record.apply_async(("later",), countdown=30).id == held.id
    assert record.apply_async(("now",)).id != plain.id  # its reservation ran out


@pytest.fixture
def far_from_utc() -> Iterator[None]:
    """The process's local time zone nine hours ahead of UTC, as on a machine in Tokyo."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.mark.parametrize("form", ["aware", "naive", "iso string"])
def test_an_eta_in_any_form_celery_takes_extends_the_reservation(
    make_app: Callable[..., Celery], far_from_utc: None, form: str
) -> None:
    """Celery takes an ``eta`` as an aware datetime, a naive one (read as UTC) or an ISO 8601
    string, whatever the machine's local time zone: each holds the message back as long,
    so each keeps the key reserved past reservation_ttl, as a countdown does."""
    app = make_app(idemtask_conf={"reservation_ttl": 1})
    record = app.tasks["t.record"]
    due = datetime.now(timezone.utc) + timedelta(seconds=30)
    eta: datetime | str = {
        "aware": due,
        "naive": due.replace(tzinfo=None),
        "iso string": due.isoformat(),
    }[form]
    held = record.apply_async((f"eta-{form}",), eta=eta)
    time.sleep(1.3)  # past reservation_ttl
    assert record.apply_async((f"eta-{form}",), eta=eta).id == held.id
