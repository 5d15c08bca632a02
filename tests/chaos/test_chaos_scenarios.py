"""Short runs of the chaos scenarios: real brokers, real worker processes, seeded faults.

Each run kills worker processes mid-body and between completion and ack, freezes one past
its lease, restarts the store's Redis (and RabbitMQ), then checks from the effect ledger and
the store that nothing was lost, nothing overlapped, nothing ran after a completion, no
stale completion was accepted, fencing tokens only grew and no delivery was acked without a
run or a replay. One run per further fault family: the store refusing writes with error
replies, the network between workers and store, bodies longer than ``result_ttl``, bodies
holding the GIL; and one per effects mode (the effect inside ``idemtask.step``, or
committed through ``idemtask.sql``) with a kill aimed between effect and completion.
``-s`` shows each run's figures. The same runner makes the long runs:
``python -m idemtask.testing.chaos --framework celery --keys 10000 --seed 1``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    kills = ("kills mid-body", "kills between completion and ack")
    kills += ("kills aimed between effect and completion",)
    assert sum(figures[name] for name in kills) == 3
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
def test_chaos_dramatiq_on_rabbitmq_with_a_broker_restart(
    rabbitmq_server: RabbitMQServer,
) -> None:
    """On the session's node (the scenario's queues are its own, by namespace): a node of
    its own would add a RabbitMQ boot, the slowest server start of the suite."""
    scenario = Scenario(
        "dramatiq", "rabbitmq", keys=50, seed=1, duration=30, broker_restarts=1, **FAULTS
    )
    _check(run_scenario(scenario, rabbitmq=rabbitmq_server), scenario)


@pytest.mark.dramatiq
def test_chaos_dramatiq_on_redis_through_the_command(tmp_path: Path) -> None:
    """The documented command itself, on a small workload: exit status 0 and the figures."""
    command = [
        sys.executable, "-m", "idemtask.testing.chaos", "--framework", "dramatiq",
        "--broker", "redis", "--keys", "50", "--seed", "2", "--kills", "3",
        "--kills-after-end", "1", "--stops", "1", "--restarts", "1", "--duration", "24",
        "--ooms", "0", "--readonlys", "0", "--misconfs", "0", "--latencies", "0",
        "--drops", "0", "--blackholes", "0",
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
    _check_plain_progress(done.stdout, done.stderr)


#: A line of the fault timeline, as the runner prints it to standard output.
TIMELINE = re.compile(
    r" *\d+\.\ds (kill(_after_end)? pid \d+|stop pid \d+ for \d+s"
    r"|store restart \(SIG(TERM|KILL), down 1s\)|\w+ skipped: no target left)"
)
#: A plain progress line (standard error is a pipe here, not a terminal).
PROGRESS = re.compile(
    r"faults (\d+)/5 (checking the ledger and the store )?keys (\d+)/50 elapsed \S+ eta (\S+)"
)


def _check_plain_progress(stdout: str, stderr: str) -> None:
    """Off a terminal the command writes plain progress lines to standard error, from the
    first (nothing done yet) to the last (every key done, the checks running), and the
    fault timeline on standard output stays whole, one fault a line."""
    timeline = stdout[: stdout.index("\n{")].splitlines()
    assert len(timeline) >= 5, stdout
    assert all(TIMELINE.fullmatch(line) for line in timeline), timeline
    lines = [found for found in map(PROGRESS.fullmatch, stderr.splitlines()) if found]
    assert lines, stderr
    first, last = lines[0], lines[-1]
    assert first.group(1, 2, 3, 4) == ("0", None, "0", "?"), first.group(0)
    checking = "checking the ledger and the store "
    assert last.group(2, 3, 4) == (checking, "50", "0s"), last.group(0)


#: The short run's faults, one of its mid-body kills aimed after the body's effect.
AFTER_EFFECT = {**FAULTS, "kills_after_effect": 1}


def _check_effects(result: Result, scenario: Scenario) -> dict[str, Any]:
    """The short run's checks, and a body really killed between its effect and completion."""
    _check(result, scenario)
    figures = result.figures()
    assert figures["effects"] == scenario.effects
    assert figures["kills aimed between effect and completion"] == 1
    assert figures["bodies killed between effect and completion"] >= 1
    return figures


@pytest.mark.dramatiq
def test_chaos_dramatiq_effects_in_steps_survive_a_kill_after_the_effect() -> None:
    """The effect inside ``idemtask.step``: the attempt after a kill between the step and the
    completion replays the step instead of doing the effect again."""
    scenario = Scenario(
        "dramatiq", "redis", keys=50, seed=1, duration=20, effects="steps", **AFTER_EFFECT
    )
    figures = _check_effects(run_scenario(scenario), scenario)
    assert figures["repeated effects after a kill"] == 0
    # A step's own effect can still repeat when a frozen holder wakes up right before it
    # (docs/steps.md); each repeat left must be that one.
    assert (
        figures["repeated effects"] == figures["repeated effects by a holder whose lease was lost"]
    )


@pytest.mark.celery
def test_chaos_celery_sql_effects_survive_a_kill_after_the_commit() -> None:
    """The effect a row written through ``idemtask.sql.atomic`` to a SQLite file: the attempt
    after a kill between the commit and the completion finds the row; one row per key."""
    scenario = Scenario(
        "celery", "redis", keys=50, seed=1, duration=20, effects="sql", **AFTER_EFFECT
    )
    figures = _check_effects(run_scenario(scenario), scenario)
    assert figures["repeated effects"] == 0  # one committed row per key
    assert figures["database effect rows"] == scenario.keys


#: Only the faults a run names; the process faults and restarts are off.
NONE = {"kills": 0, "kills_after_end": 0, "stops": 0, "store_restarts": 0}


def _clean(result: Result, scenario: Scenario) -> dict[str, int]:
    figures = result.figures()
    print(f"\n{json.dumps(figures)}\n" + "\n".join(result.fault_log))
    assert result.violations == {}
    assert (figures["keys"], figures["messages"]) == (scenario.keys, 3 * scenario.keys)
    assert figures["deliveries acked"] >= figures["messages"]  # every delivery is recorded
    return figures


@pytest.mark.celery
def test_chaos_celery_under_store_error_replies() -> None:
    """OOM, READONLY and MISCONF, 3 s each, while bodies run: the store answers, but refuses
    every write; no copy of a key may be acked unprocessed."""
    scenario = Scenario(
        "celery", "redis", keys=40, seed=1, duration=16, ooms=1, readonlys=1, misconfs=1,
        error_seconds=3.0, timeout=60, **NONE,
    )  # fmt: skip
    figures = _clean(run_scenario(scenario), scenario)
    assert (figures["OOM replies"], figures["READONLY replies"], figures["MISCONF replies"]) == (
        1, 1, 1,
    )  # fmt: skip
    assert figures["store unavailable decisions"] >= 1  # the refusals reached the guard


@pytest.mark.dramatiq
def test_chaos_dramatiq_under_network_faults_between_workers_and_store() -> None:
    """Through the fault proxy: 150 ms more per chunk, every connection dropped, and a black
    hole longer than the store client's socket timeout."""
    scenario = Scenario(
        "dramatiq", "redis", keys=40, seed=1, duration=16, latencies=1, drops=1,
        blackholes=1, timeout=90, **NONE,
    )  # fmt: skip
    figures = _clean(run_scenario(scenario), scenario)
    assert (figures["latency spells"], figures["connection drops"], figures["black holes"]) == (
        1, 1, 1,
    )  # fmt: skip
    assert figures["store unavailable decisions"] >= 1  # calls failed or timed out


@pytest.mark.dramatiq
def test_chaos_dramatiq_with_bodies_longer_than_result_ttl() -> None:
    """Bodies of 9 s with ``result_ttl`` 6 s and a 1 s lease; the kills and the stop hit
    only bodies past ``result_ttl``, whose record lives on renewals alone."""
    scenario = Scenario(
        "dramatiq", "redis", keys=30, seed=1, duration=14, lease=1.0, result_ttl=6.0,
        long_bodies=4, kills=2, kills_after_end=0, stops=1, store_restarts=0, timeout=120,
    )  # fmt: skip
    figures = _clean(run_scenario(scenario), scenario)
    assert (figures["kills mid-body"], figures["stops"]) == (2, 1)
    assert figures["lease renewals"] >= 1  # the long bodies kept their leases by renewing
    assert figures["stale completions rejected"] >= 1  # the frozen long body woke up stale


@pytest.mark.celery
def test_chaos_celery_with_bodies_that_hold_the_gil() -> None:
    """Ten bodies spin in pure Python for 1.5 leases: the lease keeper thread must still
    renew, so no copy takes a key over while its body runs."""
    scenario = Scenario(
        "celery", "redis", keys=30, seed=1, duration=12, lease=1.0, cpu_bodies=10,
        timeout=90, **NONE,
    )  # fmt: skip
    figures = _clean(run_scenario(scenario), scenario)
    assert figures["lease renewals"] >= 5
    assert (figures["leases lost"], figures["takeovers"]) == (0, 0)
