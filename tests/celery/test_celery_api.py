"""Celery's own contract, checked against a plain Task: an opted-out task behaves exactly as
one; an idempotent task accepts and refuses the calls a plain one does, with Celery's errors,
and differs only by deduplication and replay."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, Task
from celery_support import Urls
from kombu.exceptions import EncodeError
from pydantic import BaseModel, ConfigDict

from idemtask.celery import IdempotentTask
from idemtask.errors import KeyDerivationError

pytestmark = pytest.mark.celery


class Opaque(BaseModel):
    """A model no serializer can send (and idemtask cannot key)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    value: object


@pytest.fixture
def new_app(urls: Urls) -> Iterator[Callable[..., Celery]]:
    """``new_app(eager, **celery_options)``: an app on the real Redis broker and store."""
    apps: list[Celery] = []

    def make(eager: bool = False, **options: Any) -> Celery:
        app = Celery(f"api{len(apps)}", broker=urls.broker, backend=urls.backend, **options)
        app.conf.update(task_always_eager=eager, idemtask={"redis_url": urls.store})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def queue_length(urls: Urls) -> int:
    client = redis.Redis.from_url(urls.broker)
    try:
        return int(client.llen("celery"))
    finally:
        client.close()


def outcome(call: Callable[[], Any]) -> tuple[str, str]:
    """What a call gave: the error class and text, or the result's state."""
    try:
        result = call()
    except Exception as exc:
        return type(exc).__name__, str(exc).replace("plain", "NAME").replace("idem", "NAME")
    return "published", getattr(result, "state", "")


def twins(app: Celery, **options: Any) -> tuple[Task, Task]:
    """The same function as a plain task and as an idempotent one."""

    def body(token: str) -> str:
        return token

    plain = app.task(name="plain", shared=False, **options)(body)
    idem = app.task(name="idem", shared=False, base=IdempotentTask, **options)(body)
    return plain, idem


def test_an_opted_out_task_runs_as_a_plain_task(new_app: Callable[..., Celery]) -> None:
    app = new_app()

    def body(self: Task) -> tuple[int, bool, str | None]:
        stack = self.request_stack.stack
        return len(stack), bool(self.request.called_directly), self.request.id

    plain = app.task(name="plain", bind=True, shared=False)(body)
    opted_out = app.task(
        name="out", bind=True, shared=False, base=IdempotentTask, idempotent=False
    )(body)
    guarded = app.task(name="guarded", bind=True, shared=False, base=IdempotentTask)(body)
    for task in (plain, opted_out, guarded):
        result = task.apply(task_id=f"id-{task.name}")
        assert tuple(result.get()) == (1, False, f"id-{task.name}"), task.name
        depth, directly, _ = task()
        assert (depth, directly) == (1, True), task.name


@pytest.mark.parametrize("strict_app", [True, False])
def test_calls_celery_accepts_without_typing_are_accepted(
    new_app: Callable[..., Celery], urls: Urls, strict_app: bool
) -> None:
    app = new_app(strict_typing=strict_app)
    options = {"typing": False} if strict_app else {}
    plain, idem = twins(app, **options)
    assert outcome(lambda: plain.delay()) == ("published", "PENDING")
    assert outcome(lambda: idem.delay()) == ("published", "PENDING")  # no KeyDerivationError
    assert outcome(lambda: idem.delay("a", "b")) == ("published", "PENDING")
    assert queue_length(urls) == 3
    eager = new_app(eager=True, strict_typing=strict_app)
    plain, idem = twins(eager, **options)
    expected = outcome(lambda: plain.delay("e", "f"))
    assert outcome(lambda: idem.delay("e", "f")) == expected == ("published", "FAILURE")


@pytest.mark.parametrize(
    "call",
    [
        {"kwargs": "ab"},
        {"kwargs": 5},
        {"kwargs": [("token", "x")]},
        {"args": "x"},
        {"args": ("x",), "headers": "ab"},
        {"args": ("x",), "headers": 5},
        {"args": ("a", "b")},
        {"args": (Opaque(value=object()),)},
    ],
    ids=lambda call: re.sub(r" at 0x[0-9a-f]+", "", repr(call)),  # the same in every process
)
def test_bad_calls_fail_with_celerys_own_errors(
    new_app: Callable[..., Celery], urls: Urls, call: dict[str, Any]
) -> None:
    app = new_app()
    plain, idem = twins(app)
    idem.delay("x")  # a duplicate of a known call is refused as well
    expected = outcome(lambda: plain.apply_async(**call))
    assert expected[0] != "published"
    assert outcome(lambda: idem.apply_async(**call)) == expected
    assert queue_length(urls) == 1


def test_an_unserializable_model_is_an_encode_error(new_app: Callable[..., Celery]) -> None:
    app = new_app()
    plain, idem = twins(app)
    for task in (plain, idem):
        with pytest.raises(EncodeError):
            task.delay(Opaque(value=object()))
    with pytest.raises(KeyDerivationError):  # what idemtask itself cannot key, it says
        idem.idemtask_key((Opaque(value=object()),))


def test_eager_calls_take_headers_of_any_shape(new_app: Callable[..., Celery]) -> None:
    app = new_app(eager=True)
    plain, idem = twins(app)
    for headers in ("ab", 5, [("a", 1)]):
        expected = outcome(lambda: plain.apply_async(("h",), headers=headers))  # noqa: B023
        assert outcome(lambda: idem.apply_async(("h",), headers=headers)) == expected  # noqa: B023
        assert outcome(lambda: idem.apply(("h",), headers=headers)) == outcome(  # noqa: B023
            lambda: plain.apply(("h",), headers=headers)  # noqa: B023
        )


def test_eager_replace_records_the_replacement_result(
    make_app: Callable[..., Celery], counter: redis.Redis
) -> None:
    app = make_app()
    replaced = app.tasks["t.replaced"]
    # apply(): Celery's eager replace waits on the replacement, which apply_async forbids.
    first = replaced.apply(("eager-rp",))
    assert first.get() == {"token": "eager-rp-r", "done": 1}
    assert replaced.apply(("eager-rp",)).get() == {"token": "eager-rp-r", "done": 1}
    assert int(counter.get("runs:replaced:eager-rp") or 0) == 1
    assert int(counter.get("runs:eager-rp-r") or 0) == 1
