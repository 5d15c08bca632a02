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
