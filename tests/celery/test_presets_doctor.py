"""The at-least-once preset, and the doctor that checks what a worker would really use."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import celery
import pytest
from celery import Celery

from idemtask.celery import IdempotentTask, check_app, presets
from idemtask.errors import ConfigurationError
from idemtask.findings import Finding, Level, has_errors

from servers import RedisServer

pytestmark = pytest.mark.celery

CELERY_VERSION = (int(celery.VERSION[0]), int(celery.VERSION[1]))


def test_at_least_once_is_the_documented_dict() -> None:
    common = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_track_started": True,
        "broker_transport_options": {"visibility_timeout": 600},
        "result_backend_transport_options": {"visibility_timeout": 600},
    }
    if CELERY_VERSION >= (5, 7):
        # Celery 5.7 split the acks setting and added the retry variant of worker loss.
        assert presets.SPLIT_ACKS
        assert presets.at_least_once(600) == {
            **common,
            "task_retry_on_worker_lost": False,
            "task_acks_on_failure": True,
            "task_acks_on_timeout": True,
        }
        retrying = presets.at_least_once(retry_on_worker_lost=True)
        assert retrying["task_retry_on_worker_lost"] is True
        assert retrying["task_reject_on_worker_lost"] is False
    else:
        assert not presets.SPLIT_ACKS
        assert presets.at_least_once(600) == {
            **common,
            "task_acks_on_failure_or_timeout": True,
        }
        assert presets.at_least_once(600, retry_on_worker_lost=False) == presets.at_least_once(600)
        with pytest.raises(ConfigurationError, match=r"Celery >= 5\.7"):
            presets.at_least_once(retry_on_worker_lost=True)
    with pytest.raises(ConfigurationError):
        presets.at_least_once(0)


def test_apply_merges_transport_options() -> None:
    app = Celery("merge", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": "shop:", "visibility_timeout": 5}
    presets.apply(app, visibility_timeout=900)
    assert app.conf.broker_transport_options == {
        "global_keyprefix": "shop:",
        "visibility_timeout": 900,
    }
    assert app.conf.result_backend_transport_options == {"visibility_timeout": 900}
    assert app.conf.task_acks_late is True
    assert app.conf.worker_prefetch_multiplier == 1


def _app(
    broker: str, backend: str, idemtask_conf: dict[str, Any], lease: float = 120, **conf: Any
) -> Celery:
    app = Celery(
        "doctor", broker=broker, backend=backend, task_cls=IdempotentTask, set_as_current=False
    )
    app.conf.update(idemtask=idemtask_conf, **conf)

    @app.task(shared=False, name="d.charge", lease=lease, time_limit=60)
    def charge(order_id: str) -> None: ...

    @app.task(shared=False, name="d.plain", idempotent=False)
    def plain() -> None: ...

    return app


def problems(findings: list[Finding]) -> dict[str, Level]:
    return {f.code: f.level for f in findings if f.level is not Level.OK}


def test_doctor_passes_a_preset_applied_app(
    fresh_redis: Callable[..., RedisServer],
) -> None:
    store = fresh_redis(appendonly=True)
    app = _app(
        "redis://127.0.0.1:6399/0",
        "redis://127.0.0.1:6399/1",
        {"redis_url": store.url, "result_ttl": 3600},
        lease=30,  # within the task's 60 s time limit
        task_time_limit=300,
        result_expires=86400,
    )
    presets.apply(app, visibility_timeout=900)
    findings = check_app(app)
    assert problems(findings) == {}, "\n".join(map(str, findings))
    codes = [f.code for f in findings]
    for code in (
        "celery.task_options",
        "celery.unguarded",
        "celery.acks_late",
        "celery.worker_lost",
        "celery.prefetch",
        "celery.visibility_timeout",
        "celery.lease",
        "celery.result_expires",
        "celery.beat",
        "store.shared",
        "store.reachable",
        "store.eviction",
        "store.persistence",
        "celery.preset",
    ):
        assert code in codes


def test_doctor_finds_each_problem(fresh_redis: Callable[..., RedisServer]) -> None:
    store = fresh_redis()  # no AOF, no snapshots
    client = store.client()
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.close()
    app = _app(
        "redis://127.0.0.1:6399/0",
        "redis://127.0.0.1:6399/1",
        {"redis_url": store.url, "result_ttl": 7200},
        task_acks_late=True,
        worker_prefetch_multiplier=4,
        broker_transport_options={"visibility_timeout": 90},
        result_expires=600,
        beat_schedule={"nightly": {"task": "d.charge", "schedule": 86400, "args": ("o",)}},
    )
    findings = check_app(app)
    found = problems(findings)
    assert found == {
        "celery.worker_lost": Level.WARNING,
        "celery.prefetch": Level.WARNING,
        "celery.visibility_timeout": Level.WARNING,  # lease 120 s, retry delay 180 s > 90 s
        "celery.lease": Level.WARNING,  # lease 120 s > time limit 60 s
        "celery.result_expires": Level.WARNING,
        "store.eviction": Level.ERROR,
        "store.persistence": Level.WARNING,
        "celery.preset": Level.WARNING,
        "celery.beat": Level.WARNING,
    }, "\n".join(map(str, findings))
    text = {f.code: str(f) for f in findings}
    assert "allkeys-lru" in text["store.eviction"]
    assert "lease of d.charge (120s)" in text["celery.visibility_timeout"]
    assert "default_retry_delay of d.charge (180s)" in text["celery.visibility_timeout"]


def test_doctor_errors_on_memory_store_and_early_acks() -> None:
    app = _app("redis://127.0.0.1:6399/0", "redis://127.0.0.1:6399/1", {})
    findings = check_app(app)
    found = problems(findings)
    assert found["store.shared"] is Level.ERROR
    assert found["celery.acks_late"] is Level.ERROR
    assert has_errors(findings)
    eager = _app("memory://", "cache+memory://", {}, task_always_eager=True)
    assert "store.shared" not in problems(check_app(eager))


def test_doctor_reports_invalid_task_options() -> None:
    app = _app("memory://", "cache+memory://", {})

    @app.task(shared=False, name="d.bad", idempotency_key=("nope",))
    def bad(order_id: str) -> None: ...

    found = problems(check_app(app))
    assert found["celery.task_options"] is Level.ERROR


def test_doctor_finds_idemtask_options_on_a_plain_task() -> None:
    app = Celery("plain", broker="memory://", backend="cache+memory://", set_as_current=False)

    @app.task(shared=False, name="d.looks_guarded", idempotency_key=("order_id",), lease=30)
    def looks_guarded(order_id: str) -> None: ...

    @app.task(shared=False, name="d.guarded", base=IdempotentTask, lease=30)
    def guarded(order_id: str) -> None: ...

    @app.task(shared=False, name="d.plain", idempotent=False)
    def plain() -> None: ...

    findings = {f.code: f for f in check_app(app)}
    unguarded = findings["celery.unguarded"]
    assert unguarded.level is Level.ERROR
    assert unguarded.message == (
        "these tasks set idemtask options but are not IdempotentTasks, so nothing guards "
        "them: d.looks_guarded (idempotency_key, lease)"
    )
    assert "base=IdempotentTask" in unguarded.fix
    clean = _app("memory://", "cache+memory://", {})
    assert {f.code: f.level for f in check_app(clean)}["celery.unguarded"] is Level.OK


def test_doctor_warns_about_an_app_with_no_guarded_task() -> None:
    app = Celery("none", broker="memory://", backend="cache+memory://", set_as_current=False)

    @app.task(shared=False, name="d.plain_only")
    def plain_only() -> None: ...

    options = {f.code: f for f in check_app(app)}["celery.task_options"]
    assert options.level is Level.WARNING
    assert options.message == "no task of this app is guarded"
    assert "task_cls=IdempotentTask" in options.fix


def test_doctor_leaves_a_base_class_method_named_like_an_option_alone() -> None:
    """celery-singleton's ``Singleton`` has an ``on_duplicate`` method: the base class's own
    code, not an idemtask option someone gave the task."""
    singleton = pytest.importorskip("celery_singleton")
    app = Celery("peer", broker="memory://", backend="cache+memory://", set_as_current=False)

    @app.task(shared=False, name="d.singleton", base=singleton.Singleton)
    def single(order_id: str) -> None: ...

    @app.task(shared=False, name="d.singleton_leased", base=singleton.Singleton, lease=30)
    def leased(order_id: str) -> None: ...

    unguarded = {f.code: f for f in check_app(app)}["celery.unguarded"]
    assert unguarded.message.endswith("them: d.singleton_leased (lease)"), unguarded.message


SECRET = "s3cr3tPW"


def test_doctor_and_worker_start_show_no_password(
    fresh_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from idemtask.celery.startup import _on_worker_init

    down = fresh_redis()
    port = down.port
    down.stop()
    caplog.set_level(logging.DEBUG)
    urls = [
        f"redis://user:{SECRET}@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password={SECRET}",
        f"redis+sentinel://:{SECRET}@127.0.0.1:{port}/svc?sentinel_password={SECRET}",
        f"redis+sentinel://:{SECRET}@127.0.0.1:{port}/svc/x?sentinel_password={SECRET}",
    ]
    for url in urls:
        app = _app(f"redis://u:{SECRET}@127.0.0.1:{port}/0", "cache+memory://", {"redis_url": url})
        try:
            findings = check_app(app)
        except ConfigurationError as err:  # the malformed sentinel URL: refused on opening
            assert SECRET not in str(err) and "***" in str(err)
        else:
            text = "\n".join(map(str, findings))
            assert "store.reachable" in text and "***" in text and SECRET not in text
    bad = _app("memory://", "cache+memory://", {"redis_url": f"http://u:{SECRET}@h/0"})
    with pytest.raises(SystemExit) as stopped:
        _on_worker_init(sender=SimpleNamespace(app=bad))
    assert "redis_url must be a redis://" in str(stopped.value)
    assert SECRET not in str(stopped.value)
    for record in caplog.records:
        assert SECRET not in record.getMessage()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300])
def test_preset_refuses_a_visibility_timeout_that_is_no_duration(value: float) -> None:
    with pytest.raises(ConfigurationError, match="for option visibility_timeout: a finite"):
        presets.at_least_once(value)
