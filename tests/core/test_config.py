"""Settings resolution and option validation: clear errors at start-up, right precedence."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from idemtask.config import MEMORY_URL, resolve_settings
from idemtask.errors import ConfigurationError
from idemtask.policy import Policy


def test_precedence_explicit_over_framework_over_environment() -> None:
    env = {"IDEMTASK_LEASE": "10", "IDEMTASK_RESULT_TTL": "100", "IDEMTASK_ON_RUNNING": "wait"}
    settings = resolve_settings(
        {"lease": 30},
        {"lease": 20, "result_ttl": 200, "redis_url": "redis://h:1/2"},
        environ=env,
    )
    assert settings.defaults.lease == 30
    assert settings.defaults.result_ttl == 200
    assert settings.defaults.on_running == "wait"
    assert settings.redis_url == "redis://h:1/2"


def test_defaults_use_the_embedded_store() -> None:
    settings = resolve_settings(environ={})
    assert settings.redis_url == MEMORY_URL and settings.uses_memory_store
    assert settings.defaults == Policy()


def test_environment_strings_are_coerced() -> None:
    env = {
        "IDEMTASK_DEDUPE_ENQUEUE": "false",
        "IDEMTASK_MAX_DELIVERIES": "3",
        "IDEMTASK_TERMINAL_EXCEPTIONS": "builtins.KeyError, builtins.ValueError",
        "IDEMTASK_IDEMPOTENCY_KEY": "order_id,customer",
    }
    policy = resolve_settings(environ=env).defaults
    assert policy.dedupe_enqueue is False and policy.max_deliveries == 3
    assert policy.terminal_exceptions == (KeyError, ValueError)
    assert policy.idempotency_key == ("order_id", "customer")


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"leese": 3}, "unknown idemtask setting(s) leese"),
        ({"lease": "soon"}, "invalid value 'soon' for option lease"),
        ({"lease": 0}, "lease must be > 0"),
        ({"result_ttl": 0}, "result_ttl must be > 0 seconds, got 0.0"),
        ({"on_running": "skip"}, "on_running must be one of defer, wait, raise, drop"),
        ({"redis_url": "http://x"}, "redis_url must be a redis://"),
        ({"terminal_exceptions": ["no.such.Error"]}, "cannot import 'no.such.Error'"),
        ({"terminal_exceptions": [int]}, "must list exception classes"),
        ({"dedupe_enqueue": "maybe"}, "invalid value 'maybe' for option dedupe_enqueue"),
    ],
)
def test_bad_settings_name_the_problem(layer: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_settings(framework=layer, framework_name="app.conf.idemtask", environ={})
    assert message in str(info.value)
    assert "app.conf.idemtask" in str(info.value) or "redis_url" in message


def test_unknown_environment_variable_is_reported() -> None:
    with pytest.raises(ConfigurationError, match="environment: unknown idemtask setting"):
        resolve_settings(environ={"IDEMTASK_LEASE_SECONDS": "3"})


def test_django_settings_layer() -> None:
    script = textwrap.dedent(
        """
        import django
        from django.conf import settings
        settings.configure(IDEMTASK={"lease": 42, "redis_url": "redis://django:6379/0"})
        django.setup()
        from idemtask.config import resolve_settings
        s = resolve_settings(framework={"lease": 7}, environ={"IDEMTASK_RESULT_TTL": "99"})
        t = resolve_settings(environ={"IDEMTASK_LEASE": "5"})
        print(s.defaults.lease, s.redis_url, s.defaults.result_ttl, t.defaults.lease)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    # framework beats Django; Django beats the environment.
    assert out == ["7.0", "redis://django:6379/0", "99.0", "42.0"]


def test_errors_survive_pickling_and_rebuilding_from_args() -> None:
    """Celery rebuilds a task's exception as ``cls(*args)`` in the caller's process."""
    import pickle

    from idemtask import errors

    samples = [
        errors.KeyDerivationError("cannot encode value of type object", "order.items[3]"),
        errors.DuplicateTaskError("k", "t1", "queued"),
        errors.AlreadyRunningError("k", "t1", 1.5),
        errors.IdempotencyConflict("k", "t1"),
        errors.LeaseLostError("k"),
        errors.TaskFailedError("k", "t1", "KeyError: 'x'"),
        errors.PoisonMessageError("k", "t1", "poison: 5 deliveries ended without a result"),
    ]
    for error in samples:
        for copy in (pickle.loads(pickle.dumps(error)), type(error)(*error.args)):
            assert type(copy) is type(error) and str(copy) == str(error)
            assert vars(copy) == vars(error)


@pytest.mark.parametrize("option", ["lease", "result_ttl", "reservation_ttl", "wait_timeout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", 1e300])
def test_durations_must_be_finite_and_in_range(option: str, value: object) -> None:
    """NaN passed every comparison and inf failed only at the first task (OverflowError)."""
    with pytest.raises(ConfigurationError) as info:
        resolve_settings(framework={option: value}, framework_name="app.conf.idemtask", environ={})
    message = str(info.value)
    assert message.startswith(f"app.conf.idemtask: invalid value {value!r} for option {option}")
    assert "a finite number of seconds <= 3153600000 (100 years) is expected" in message


def test_environment_durations_are_checked_too() -> None:
    expected = "environment: invalid value 'NaN' for option lease: a finite"
    with pytest.raises(ConfigurationError, match=expected):
        resolve_settings(environ={"IDEMTASK_LEASE": "NaN"})
    expected = "environment: invalid value 'inf' for option reservation_ttl"
    with pytest.raises(ConfigurationError, match=expected):
        resolve_settings(environ={"IDEMTASK_RESERVATION_TTL": "inf"})


def test_task_options_are_checked_like_settings() -> None:
    source = "task shop.charge"
    with pytest.raises(ConfigurationError, match=f"{source}: invalid value nan for option lease"):
        Policy().with_options({"lease": float("nan")}, source=source)
    with pytest.raises(ConfigurationError, match="invalid value inf for option wait_timeout"):
        Policy().with_options({"wait_timeout": float("inf")}, source=source)


@pytest.mark.parametrize(
    "option", ["max_deliveries", "max_result_bytes", "idempotency_key_version"]
)
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 2.5, 10**30])
def test_counts_must_be_whole_and_in_range(option: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=f"app.conf.idemtask: .*{option}"):
        resolve_settings(framework={option: value}, framework_name="app.conf.idemtask", environ={})


@pytest.mark.parametrize("setting", ["wait_replicas", "wait_timeout_ms"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), "inf", 10**30])
def test_store_counts_must_be_in_range(setting: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=f"{setting} must be an integer"):
        resolve_settings(framework={setting: value}, environ={})


def test_the_longest_durations_work_on_a_real_redis(redis_url: str) -> None:
    """The upper bound is one the store really handles: keys, leases and TTLs in range."""
    from idemtask.codecs import JsonCodec
    from idemtask.guard import Call, Guard
    from idemtask.policy import MAX_SECONDS
    from idemtask.store import RedisStore

    longest = resolve_settings(
        framework={"lease": MAX_SECONDS, "result_ttl": MAX_SECONDS, "reservation_ttl": MAX_SECONDS},
        environ={},
    ).defaults
    store = RedisStore.from_url(redis_url)
    guard = Guard(store)
    call = Call("shop.charge", "longest", "fp")
    assert guard.reserve(longest, call, "t1") is None
    assert guard.run(longest, call, "t1", lambda: 7, JsonCodec()) == 7
    record = store.inspect("longest")
    assert record is not None and record.state.value == "done"
    assert record.ttl_ms > (MAX_SECONDS - 60) * 1000
    with pytest.raises(ConfigurationError, match="for option lease: a finite number"):
        resolve_settings(framework={"lease": MAX_SECONDS * 1.01}, environ={})


@pytest.mark.parametrize(
    ("layer", "hint"),
    [
        ({"leese": 3}, "leese (did you mean lease?)"),
        ({"redis_ulr": "redis://h"}, "redis_ulr (did you mean redis_url?)"),
        ({"idempotency_kye": "order_id"}, "idempotency_kye (did you mean idempotency_key?)"),
    ],
)
def test_unknown_settings_suggest_the_close_name(layer: dict[str, object], hint: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_settings(framework=layer, framework_name="app.conf.idemtask", environ={})
    assert hint in str(info.value)


def test_check_option_names_refuses_lookalikes_only() -> None:
    from idemtask.policy import check_option_names

    with pytest.raises(ConfigurationError) as info:
        check_option_names(["idempotency_kye", "leese", "autoretry_for"], source="task t")
    message = str(info.value)
    assert message.startswith("task t: ")
    assert "idempotency_kye (did you mean idempotency_key?)" in message
    assert "leese (did you mean lease?)" in message
    assert "autoretry_for" not in message
    check_option_names(["autoretry_for", "max_retries", "order_id", "lease"], source="task t")
    # Dramatiq spells result_ttl idempotency_result_ttl; each adapter is told its own spelling.
    with pytest.raises(ConfigurationError, match=r"did you mean result_ttl\?"):
        check_option_names(["idempotency_result_ttl"], source="task t")
    with pytest.raises(ConfigurationError, match=r"did you mean idempotency_result_ttl\?"):
        check_option_names(
            ["idempotency_result_tll"],
            source="actor a",
            spellings={"idempotency_result_ttl": "result_ttl", "lease": "lease"},
        )
