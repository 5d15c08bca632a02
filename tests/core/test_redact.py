"""No secret of a store URL in anything idemtask prints, logs or raises."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from idemtask.config import resolve_settings
from idemtask.errors import ConfigurationError, IdempotencyError
from idemtask.redact import redact_text, redact_url
from idemtask.runtime import open_store

from servers import RedisServer

SECRET = "s3cr3tPW"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:s3cr3tPW@h:6379/0", "redis://user:***@h:6379/0"),
        ("rediss://:s3cr3tPW@h:6380", "rediss://:***@h:6380"),
        ("redis://h:6379/0?password=s3cr3tPW&db=1", "redis://h:6379/0?password=***&db=1"),
        ("redis://h/0?ssl_password=s3cr3tPW", "redis://h/0?ssl_password=***"),
        ("redis://h/0?Auth_Token=s3cr3tPW&x=1", "redis://h/0?Auth_Token=***&x=1"),
        ("redis://h/0?client_secret=s3cr3tPW", "redis://h/0?client_secret=***"),
        ("redis://h/0?api_key=s3cr3tPW", "redis://h/0?api_key=***"),
        ("unix://u:s3cr3tPW@/tmp/r.sock?db=0", "unix://u:***@/tmp/r.sock?db=0"),
        ("unix:///tmp/r.sock?password=s3cr3tPW", "unix:///tmp/r.sock?password=***"),
        (
            "redis+sentinel://:s3cr3tPW@h1:26379,h2:26379/svc/1?sentinel_password=s3cr3tPW",
            "redis+sentinel://:***@h1:26379,h2:26379/svc/1?sentinel_password=***",
        ),
        (
            "redis+cluster://u:s3cr3tPW@h1:7000,[::1]:7001/",
            "redis+cluster://u:***@h1:7000,[::1]:7001/",
        ),
        ("redis://:s3cr@t/PW@h:1/0", "redis://:***@h:1/0"),  # unescaped "@" and "/"
        ("redis://user@h:1/0", "redis://user@h:1/0"),  # a user name alone is no secret
        ("redis://h:1/0?db=2", "redis://h:1/0?db=2"),
        ("memory://", "memory://"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_finds_urls_and_assignments() -> None:
    text = (
        f"bad database number in 'redis+sentinel://:{SECRET}@h:1/s/x?sentinel_password={SECRET}'"
        f"; Connection(host=h,password={SECRET},db=0)"
    )
    redacted = redact_text(text)
    assert SECRET not in redacted
    assert "'redis+sentinel://:***@h:1/s/x?sentinel_password=***'" in redacted
    assert "password=***,db=0" in redacted
    options = {"sentinel_kwargs": {"password": SECRET}, "visibility_timeout": 60, "x_token": 1}
    assert redact_text(repr(options)) == (
        "{'sentinel_kwargs': {'password': '***'}, 'visibility_timeout': 60, 'x_token': ***}"
    )


def _urls(port: int) -> list[str]:
    return [
        f"redis://user:{SECRET}@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password={SECRET}",
        f"redis+sentinel://:{SECRET}@127.0.0.1:{port}/svc?sentinel_password={SECRET}",
    ]


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{SECRET}@h/0",
        f"http://h/0?password={SECRET}",
        f"sentinel://:{SECRET}@h:1/svc?sentinel_password={SECRET}",
        {"host": "h", "password": SECRET},
    ],
)
def test_configuration_errors_carry_no_password(url: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_settings({"redis_url": url}, environ={})
    assert "redis_url must be a redis://" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"redis+sentinel://:{SECRET}@127.0.0.1:1/svc/notadb?sentinel_password={SECRET}",
        f"redis+sentinel://:{SECRET}@127.0.0.1:1/?sentinel_password={SECRET}",
        f"redis+cluster://u:{SECRET}@127.0.0.1:x/",
        f"redis+cluster://u:{SECRET}@127.0.0.1:7000/3",
    ],
)
def test_errors_opening_the_store_carry_no_password(url: str) -> None:
    with pytest.raises(IdempotencyError) as info:
        open_store(resolve_settings({"redis_url": url}, environ={}))
    assert SECRET not in str(info.value)
    assert "***" in str(info.value)


def test_unreachable_store_errors_and_logs_carry_no_password(
    fresh_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    from idemtask.codecs import JsonCodec
    from idemtask.guard import Call, Guard

    down = fresh_redis()
    port = down.port
    down.stop()
    caplog.set_level(logging.DEBUG)
    for url in _urls(port):
        settings = resolve_settings({"redis_url": url, "on_store_error": "run"}, environ={})
        assert SECRET not in repr(settings)
        store = open_store(settings)
        guard = Guard(store)
        # fail open: runs the body and logs that the store was not reachable
        assert guard.run(settings.defaults, Call("t", "k", "f"), "id", lambda: 1, JsonCodec()) == 1
    assert caplog.records, "the store errors were logged"
    for record in caplog.records:
        assert SECRET not in record.getMessage()
