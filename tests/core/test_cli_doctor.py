"""``idemtask doctor`` on real app modules, as a user runs it: a finding per wrong setting."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def doctor(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idemtask", "doctor", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.celery
def test_doctor_finds_a_misconfigured_celery_app(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "shop_bad.py").write_text(
        textwrap.dedent(
            f"""
            from celery import Celery
            from idemtask.celery import IdempotentTask

            app = Celery("shop", broker="{redis_url}", backend="{redis_url}",
                         task_cls=IdempotentTask)

            @app.task(idempotency_key=("order_id",))
            def charge(order_id, amount):
                return amount
            """
        )
    )
    (tmp_path / "shop_good.py").write_text(
        textwrap.dedent(
            f"""
            from celery import Celery
            from idemtask.celery import IdempotentTask, presets

            app = Celery("shop", broker="{redis_url}", backend="{redis_url}",
                         task_cls=IdempotentTask)
            presets.apply(app, visibility_timeout=3600)
            app.conf.task_time_limit = 600
            app.conf.idemtask = {{"redis_url": "{redis_url}", "lease": 30}}

            @app.task(idempotency_key=("order_id",))
            def charge(order_id, amount):
                return amount
            """
        )
    )
    bad = doctor(tmp_path, "--celery", "shop_bad:app")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "[ERROR] celery.acks_late: task_acks_late is False" in bad.stdout
    assert "[ERROR] store.shared: the store is the in-process MemoryStore" in bad.stdout
    assert "-> task_acks_late=True" in bad.stdout
    good = doctor(tmp_path, "--celery", "shop_good:app")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "[ERROR]" not in good.stdout and "0 errors" in good.stdout


@pytest.mark.dramatiq
def test_doctor_finds_a_misconfigured_dramatiq_broker(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "worker_bad.py").write_text(
        textwrap.dedent(
            f"""
            import dramatiq
            from dramatiq.brokers.redis import RedisBroker
            from idemtask.dramatiq import IdempotencyMiddleware

            broker = RedisBroker(url="{redis_url}", heartbeat_timeout=5000)
            broker.add_middleware(IdempotencyMiddleware(redis_url="{redis_url}", lease=60))
            dramatiq.set_broker(broker)

            @dramatiq.actor(idempotent=True)
            def charge(order_id, amount):
                return amount
            """
        )
    )
    bad = doctor(tmp_path, "--dramatiq", "worker_bad:broker")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "[ERROR] dramatiq.middleware_order" in bad.stdout  # added after Retries
    assert "[WARNING] dramatiq.heartbeat_timeout" in bad.stdout  # 5 s < the 60 s lease


SECRET = "s3cr3tPW"


def _secret_urls(live: int, down: int) -> list[str]:
    """A password in the userinfo and in ``?password=`` (of a Redis that requires it), and in
    a sentinel URL's ``?sentinel_password=`` (of a sentinel that is down)."""
    return [
        f"redis://default:{SECRET}@127.0.0.1:{live}/0",
        f"redis://127.0.0.1:{live}/0?password={SECRET}",
        f"redis+sentinel://:{SECRET}@127.0.0.1:{down}/svc?sentinel_password={SECRET}",
    ]


@pytest.fixture
def ports(fresh_redis) -> tuple[int, int]:
    """(a Redis that requires SECRET, a port nothing listens on)."""
    live = fresh_redis()
    client = live.client()
    client.config_set("requirepass", SECRET)
    client.close()
    down = fresh_redis()
    port = down.port
    down.stop()
    return int(live.port), int(port)


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idemtask", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.celery
def test_doctor_prints_no_password_of_a_celery_app(tmp_path: Path, ports: tuple[int, int]) -> None:
    for i, url in enumerate(_secret_urls(*ports)):
        (tmp_path / f"secret_celery{i}.py").write_text(
            textwrap.dedent(
                f"""
                from celery import Celery
                from idemtask.celery import IdempotentTask

                app = Celery("shop", broker="memory://", task_cls=IdempotentTask)
                app.conf.idemtask = {{"redis_url": {url!r}}}

                @app.task(idempotency_key=("order_id",))
                def charge(order_id, amount):
                    return amount
                """
            )
        )
        out = doctor(tmp_path, "--celery", f"secret_celery{i}:app")
        assert "store.reachable: " in out.stdout and "***" in out.stdout, out.stdout + out.stderr
        assert SECRET not in out.stdout + out.stderr


@pytest.mark.dramatiq
def test_doctor_prints_no_password_of_a_dramatiq_broker(
    tmp_path: Path, ports: tuple[int, int]
) -> None:
    for i, url in enumerate(_secret_urls(*ports)):
        (tmp_path / f"secret_dramatiq{i}.py").write_text(
            textwrap.dedent(
                f"""
                import dramatiq
                from dramatiq.brokers.stub import StubBroker
                from dramatiq.middleware import Retries
                from idemtask.dramatiq import IdempotencyMiddleware

                broker = StubBroker()
                broker.add_middleware(IdempotencyMiddleware(redis_url={url!r}), before=Retries)

                @dramatiq.actor(broker=broker, idempotent=True)
                def charge(order_id, amount):
                    return amount
                """
            )
        )
        out = doctor(tmp_path, "--dramatiq", f"secret_dramatiq{i}:broker")
        assert "store.reachable: " in out.stdout and "***" in out.stdout, out.stdout + out.stderr
        assert SECRET not in out.stdout + out.stderr


def test_cli_errors_print_no_password(tmp_path: Path, ports: tuple[int, int]) -> None:
    live, down = ports
    failing = [
        f"redis://default:{SECRET}@127.0.0.1:{down}/0",  # unreachable
        f"redis://127.0.0.1:{live}/0?password=wrong-{SECRET}",  # refused by the server
        f"redis+sentinel://:{SECRET}@127.0.0.1:{down}/svc?sentinel_password={SECRET}",
        f"http://user:{SECRET}@127.0.0.1/0?password={SECRET}",  # refused by the settings
        f"redis+sentinel://:{SECRET}@127.0.0.1:1/svc/notadb?sentinel_password={SECRET}",
        f"redis+cluster://u:{SECRET}@127.0.0.1:x/",  # refused when the store is opened
    ]
    for url in failing:
        for args in (["--redis", url, "inspect", "k"], ["--debug", "--redis", url, "list"]):
            out = run_cli(tmp_path, *args)
            assert out.returncode != 0 and out.stderr.strip(), out.stdout + out.stderr
            assert SECRET not in out.stdout + out.stderr, out.stderr
    demo = run_cli(tmp_path, "demo", "--redis", f"redis://:{SECRET}@127.0.0.1:{live}/0")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert f"store on redis://:***@127.0.0.1:{live}/0" in demo.stdout
    assert SECRET not in demo.stdout + demo.stderr


STUB_BROKER = """
import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries
from dramatiq.results import Results
from dramatiq.results.backends import StubBackend
from idemtask.dramatiq import IdempotencyMiddleware

broker = StubBroker()
{results}
broker.add_middleware(IdempotencyMiddleware(), before=Retries)

@dramatiq.actor(broker=broker, idempotent=True)
def charge(order_id, amount):
    return amount
"""


@pytest.mark.dramatiq
def test_fail_level_warning_fails_on_a_warning_and_passes_a_clean_broker(tmp_path: Path) -> None:
    (tmp_path / "warned.py").write_text(STUB_BROKER.format(results=""))
    with_results = "broker.add_middleware(Results(backend=StubBackend(), store_results=True))"
    (tmp_path / "clean.py").write_text(STUB_BROKER.format(results=with_results))
    warned = doctor(tmp_path, "--dramatiq", "warned:broker")
    assert warned.returncode == 0, warned.stdout + warned.stderr
    assert "[WARNING] dramatiq.results" in warned.stdout and "0 errors, 1 warnings" in warned.stdout
    assert doctor(tmp_path, "--dramatiq", "warned:broker", "--fail-level", "error").returncode == 0
    strict = doctor(tmp_path, "--dramatiq", "warned:broker", "--fail-level", "warning")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    clean = doctor(tmp_path, "--dramatiq", "clean:broker", "--fail-level", "warning")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 errors, 0 warnings" in clean.stdout


@pytest.mark.dramatiq
def test_fail_level_warning_also_fails_on_an_error(tmp_path: Path) -> None:
    (tmp_path / "erred.py").write_text(
        STUB_BROKER.format(results="").replace(", before=Retries", "")
    )
    out = doctor(tmp_path, "--dramatiq", "erred:broker", "--fail-level", "warning")
    assert out.returncode == 1 and "[ERROR] dramatiq.middleware_order" in out.stdout, out.stdout
    bad = doctor(tmp_path, "--dramatiq", "erred:broker", "--fail-level", "info")
    assert bad.returncode == 2 and "Invalid value for '--fail-level'" in bad.stderr
