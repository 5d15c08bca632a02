"""idemtask's metrics for real: a prefork Celery worker and a Dramatiq worker under load,
scraped by a real ``prometheus`` server, and every expression of the shipped Grafana
dashboard run through Prometheus's HTTP API."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from idemtask.contrib.prometheus import dashboard, dashboard_expressions

from servers import LOOPBACK, free_port, terminate_session
from servers_prometheus import PrometheusServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
#: Where the docs' panel plot is written when this is set (docs/img when regenerating).
PLOT_DIR_ENV = "MTEST_PLOT_DIR"


def _db(url: str, number: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{number}"


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def celery_worker(redis_url: str, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """``celery worker --pool=prefork -c 2`` serving ``/metrics``; (metrics port, log)."""
    port = free_port()
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    log = tmp_path / "worker.log"
    env = _env(
        MTEST_BROKER=_db(redis_url, 0),
        MTEST_BACKEND=_db(redis_url, 1),
        MTEST_STORE=_db(redis_url, 2),
        MTEST_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
    )
    command = [
        sys.executable, "-m", "celery", "-A", "metrics_celery_app", "worker",
        "--pool=prefork", "-c", "2", "--loglevel=INFO", "--without-gossip",
        "--without-mingle", "--without-heartbeat", f"--logfile={log}",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env, cwd=HERE, start_new_session=True)
    try:
        _wait(lambda: log.exists() and "ready." in log.read_text(), 60, "the worker")
        yield port, log
    finally:
        terminate_session(proc, grace=0)  # the test is over: no warm shutdown


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as answer:
        text: str = answer.read().decode()
    return text


def _answers(port: int) -> bool:
    try:
        _scrape(port)
    except OSError:
        return False
    return True


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition ``text`` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _load(redis_url: str, round_: int) -> None:
    """Unique calls, duplicates, replays, a busy copy, and a frozen holder taken over."""
    producer = Celery("producer", broker=_db(redis_url, 0), backend=_db(redis_url, 1))
    pids = redis.Redis.from_url(_db(redis_url, 2))
    try:
        frozen = f"frozen-{round_}"
        producer.send_task("metrics.fanout", args=[20 + round_]).get(timeout=30)
        for _ in range(5):  # copies of completed calls, as another producer would send them
            producer.send_task("metrics.charge", args=[3]).get(timeout=30)
        first = producer.send_task("metrics.slow", args=[frozen, 3.0])
        _wait(lambda: pids.llen(f"pids:{frozen}") == 1, 20, "the slow body to start")
        holder = int(pids.lindex(f"pids:{frozen}", 0) or 0)
        os.kill(holder, signal.SIGSTOP)  # its lease keeper stops with it
        try:
            copy = producer.send_task("metrics.slow", args=[frozen, 3.0])
            # The copy finds the key busy, is deferred, takes it over once the lease ends.
            assert copy.get(timeout=30) == frozen
        finally:
            os.kill(holder, signal.SIGCONT)
        # The frozen holder finishes, its completion is rejected, it answers the record.
        assert first.get(timeout=30) == frozen
    finally:
        pids.close()
        producer.close()


def test_the_dashboard_shows_a_real_worker(
    celery_worker: tuple[int, Path], redis_url: str, tmp_path: Path
) -> None:
    port, log = celery_worker
    prometheus = PrometheusServer([f"{LOOPBACK}:{port}"], tmp_path)
    try:
        _wait(prometheus.targets_up, 30, "prometheus to scrape the worker")
        start = time.time()
        # A counter's rate needs two samples of its series: the first round creates every
        # series (task, decision), the second makes them grow between scrapes.
        _load(redis_url, 1)
        loaded = time.time()
        _wait(lambda: prometheus.last_scrape() > loaded, 30, "a scrape after the first round")
        _load(redis_url, 2)
        text = _scrape(port)
        for decision in ("new", "duplicate", "acquired", "completed", "replayed", "busy",
                         "deferred", "takeover", "stale_completion"):  # fmt: skip
            # (lease_lost too, when the resumed holder's keeper renews before its body ends:
            # which comes first after SIGCONT is timing, so it is not asserted)
            assert _sample(text, "idemtask_decisions_total", decision=decision) > 0, (
                decision,
                log.read_text()[-3000:],
            )
        assert _sample(text, "idemtask_leases_held") == 0  # nothing runs any more
        # Two more scrapes after the last decision: scrapes come every second, so when one
        # begun 1.5 s after it is stored, the one before it also began after it.
        loaded = time.time()
        _wait(lambda: prometheus.last_scrape() > loaded + 1.5, 30, "two more scrapes")
        end = time.time()
        for expr in dashboard_expressions():
            series = prometheus.query_range(expr, start - 5, end)
            values = [float(v) for s in series for _, v in s["values"]]
            assert any(v > 0 and not math.isnan(v) for v in values), (expr, series)
        _plot_decisions(prometheus, start - 5, end, tmp_path)
    finally:
        prometheus.close()


def _plot_decisions(prometheus: PrometheusServer, start: float, end: float, tmp: Path) -> None:
    """The dashboard's first panel, as a PNG (docs/img/dashboard-decisions.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel = dashboard()["panels"][0]
    expr = panel["targets"][0]["expr"]
    series = prometheus.query_range(expr, start, end)
    figure, axes = plt.subplots(figsize=(8, 3.6), dpi=100)
    for one in sorted(series, key=lambda s: s["metric"].get("decision", "")):
        times = [float(t) - start for t, _ in one["values"]]
        axes.plot(times, [float(v) for _, v in one["values"]], label=one["metric"]["decision"])
    axes.set_title(f"{panel['title']} (prefork Celery worker under test load)")
    axes.set_xlabel("seconds")
    axes.set_ylabel("decisions / s (1 min rate)")
    axes.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    folder = Path(os.environ.get(PLOT_DIR_ENV) or tmp)
    target = folder / "dashboard-decisions.png"
    figure.savefig(target)
    plt.close(figure)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def dramatiq_worker(redis_url: str, tmp_path: Path) -> Iterator[int]:
    """``dramatiq`` with its Prometheus middleware and idemtask's metrics; the port."""
    port = free_port()
    database = tmp_path / "dramatiq-prom"
    database.mkdir()
    log = tmp_path / "dramatiq.log"
    env = _env(
        MTEST_BROKER=_db(redis_url, 4),
        MTEST_STORE=_db(redis_url, 2),
        dramatiq_prom_db=str(database),
        dramatiq_prom_host=LOOPBACK,
        dramatiq_prom_port=str(port),
    )
    command = [sys.executable, "-m", "dramatiq", "metrics_dramatiq_app", "-p", "2", "-t", "2"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, cwd=HERE, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        _wait(lambda: "Worker process is ready" in log.read_text(), 60, "the Dramatiq worker")
        # Dramatiq's exposition server is a separate fork that may start listening later.
        _wait(lambda: _answers(port), 60, "Dramatiq's metrics endpoint")
        yield port
    finally:
        terminate_session(proc, grace=0)  # the test is over: no warm shutdown


def test_a_dramatiq_worker_serves_idemtask_metrics(dramatiq_worker: int, redis_url: str) -> None:
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("MTEST_BROKER", _db(redis_url, 4))
    os.environ.setdefault("MTEST_STORE", _db(redis_url, 2))
    try:
        import metrics_dramatiq_app as app
    finally:
        sys.path.remove(str(HERE))
    for order_id in range(10):
        app.charge.send(order_id)
        app.charge.send(order_id)  # a duplicate, saved at enqueue in this process
    done = re.compile(r'idemtask_decisions_total\{.*decision="completed".*\} (\S+)')

    def completed() -> float:
        return sum(float(v) for v in done.findall(_scrape(dramatiq_worker)))

    _wait(lambda: completed() >= 10, 30, "ten completions on the Dramatiq endpoint")
    text = _scrape(dramatiq_worker)
    assert _sample(text, "idemtask_decisions_total", decision="acquired") == 10
    assert "idemtask_leases_held" in text
    assert _sample(text, "dramatiq_messages_total") >= 10  # Dramatiq's own, same endpoint
