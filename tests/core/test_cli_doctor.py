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
