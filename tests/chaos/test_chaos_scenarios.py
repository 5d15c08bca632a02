"""Short runs of the chaos scenarios: real brokers, real worker processes, seeded faults.

Each run kills worker processes mid-body and between completion and ack, freezes one past
its lease, restarts the store's Redis (and RabbitMQ), then checks from the effect ledger and
the store that nothing was lost, nothing overlapped, nothing ran after a completion and no
stale completion was accepted. ``-s`` shows each run's figures. The same runner makes the
long runs: ``python -m idemtask.testing.chaos --framework celery --keys 10000 --seed 1``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from idemtask.testing.chaos import Result, Scenario, run_scenario

from servers import RabbitMQServer

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

FAULTS = {"kills": 3, "kills_after_end": 1, "stops": 1, "store_restarts": 1}


def _check(result: Result, scenario: Scenario) -> None:
    figures = result.figures()
    print(f"\n{json.dumps(figures)}\n" + "\n".join(result.fault_log))
    assert result.violations == {}
    assert figures["keys"] == scenario.keys
    assert figures["messages"] == 3 * scenario.keys
    # The faults really happened and really hit the guard.
    assert figures["kills mid-body"] + figures["kills between completion and ack"] == 3
    assert figures["stops"] == 1
    assert figures["store restarts"] == 1
    assert figures["broker restarts"] == scenario.broker_restarts
    assert figures["takeovers"] >= 1  # a killed or frozen holder's key was taken over
    assert figures["stale completions rejected"] >= 1  # the frozen holder woke up stale
    assert figures["replayed"] >= scenario.keys  # the other copies got the stored result
    assert figures["body starts"] >= scenario.keys + 1  # a kill mid-body reran one body


@pytest.mark.celery
def test_chaos_celery_prefork_on_redis() -> None:
    scenario = Scenario("celery", "redis", keys=50, seed=1, duration=20, **FAULTS)
    _check(run_scenario(scenario), scenario)


@pytest.mark.dramatiq
@pytest.mark.rabbitmq
def test_chaos_dramatiq_on_rabbitmq_with_a_broker_restart() -> None:
    scenario = Scenario(
        "dramatiq", "rabbitmq", keys=50, seed=1, duration=30, broker_restarts=1, **FAULTS
    )
    with RabbitMQServer() as node:
        _check(run_scenario(scenario, rabbitmq=node), scenario)


@pytest.mark.dramatiq
def test_chaos_dramatiq_on_redis_through_the_command(tmp_path: Path) -> None:
    """The documented command itself, on a small workload: exit status 0 and the figures."""
    command = [
        sys.executable, "-m", "idemtask.testing.chaos", "--framework", "dramatiq",
        "--broker", "redis", "--keys", "50", "--seed", "2", "--kills", "3",
        "--kills-after-end", "1", "--stops", "1", "--restarts", "1", "--duration", "24",
        "--workdir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((tmp_path / "result.json").read_text())
    assert figures["scenario"] == "dramatiq-redis"
    assert (figures["keys"], figures["messages"]) == (50, 150)
    for name in ("lost", "overlaps", "runs after completion", "stale completions accepted",
                 "double completions", "repeated effects not explained by a crash",
                 "stale fenced writes accepted", "store records not done"):  # fmt: skip
        assert figures[name] == 0, name
    assert figures["kills mid-body"] + figures["kills between completion and ack"] == 3
    assert (figures["stops"], figures["store restarts"]) == (1, 1)
    assert figures["stale completions rejected"] >= 1
