"""What the chaos scenarios run: the key plan, the task body and the settings that worker and
producer processes read from their environment.

Every process of a run (the runner, the producers, the workers) imports this module, so the
body, the plan and the variable names cannot drift apart between them.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from idemtask.testing.chaos import effects
from idemtask.testing.ledger import EffectLedger

#: How many times each key is submitted, and by how many producer processes.
SUBMISSIONS = 3
PRODUCERS = 2
#: Seconds a lingering delivery waits after its completion is recorded and before the broker
#: ack: the window in which a kill leaves a finished message unacked.
LINGER = 0.3
#: One key in this many lingers; evenly spaced, so every stretch of a run has some.
LINGER_EVERY = 10
TASK_NAME = "idemtask_chaos.work"
#: How far (a fraction of the plan) a submission may land from its key's place in the plan.
SPREAD = 0.1

#: Not ``IDEMTASK_``: idemtask reads those as its own settings and rejects unknown ones.
ENV_PREFIX = "IDTCHAOS_"


@dataclass(frozen=True, slots=True)
class Job:
    """One key of the workload and how its body behaves (the same on every delivery)."""

    key: str
    ms: int  # body duration
    linger: bool  # sleep between the completion and the ack
    fenced: bool  # also write through the fencing token
    producers: tuple[int, ...]  # which producer submits it, once per entry
    cpu: bool = False  # spin in pure Python (holding the GIL) instead of sleeping


@dataclass(frozen=True, slots=True)
class Special:
    """Keys whose bodies are not the usual 5–200 ms sleep: ``long`` of them sleep ``long_ms``
    (longer than ``result_ttl``), ``cpu`` of them spin for ``cpu_ms`` holding the GIL."""

    long: int = 0
    long_ms: int = 0
    cpu: int = 0
    cpu_ms: int = 0


def plan(keys: int, seed: int, special: Special = Special()) -> list[Job]:
    """The seeded workload: ``keys`` jobs of 5–200 ms, each submitted ``SUBMISSIONS`` times.

    Each producer submits every key at least once, so duplicates really come from different
    processes; the third submission goes to a seeded one of them. The ``special`` keys are
    picked by a seeded draw of their own, so the rest of the plan stays the same per seed.
    """
    rng = random.Random(f"plan-{seed}")
    jobs = []
    for index in range(keys):
        extra = tuple(rng.randrange(PRODUCERS) for _ in range(SUBMISSIONS - PRODUCERS))
        jobs.append(
            Job(
                key=f"k{index:06d}",
                ms=rng.randint(5, 200),
                linger=index % LINGER_EVERY == LINGER_EVERY // 2,
                fenced=rng.random() < 0.5,
                producers=(*range(PRODUCERS), *extra),
            )
        )
    if special.long + special.cpu > keys:
        raise ValueError(f"{special.long} long and {special.cpu} CPU bodies in {keys} keys")
    picked = random.Random(f"special-{seed}").sample(range(keys), special.long + special.cpu)
    for index in picked[: special.long]:
        jobs[index] = replace(jobs[index], ms=special.long_ms)
    for index in picked[special.long :]:
        jobs[index] = replace(jobs[index], ms=special.cpu_ms, cpu=True)
    return jobs


def producer_share(jobs: list[Job], producer: int, seed: int) -> list[Job]:
    """The submissions of one producer, in its own seeded order.

    Each submission goes to a seeded place within ``SPREAD`` of its key's place in the plan:
    the copies of a key arrive apart (from different producers, some while the first runs,
    some after it completed) and new keys keep coming until the end, so late faults still
    find bodies to hit.
    """
    rng = random.Random(f"producer-{seed}-{producer}")
    spread = max(5.0, SPREAD * len(jobs))
    placed = [
        (index + rng.uniform(0, spread), job)
        for index, job in enumerate(jobs)
        for p in job.producers
        if p == producer
    ]
    return [job for _, job in sorted(placed, key=lambda item: item[0])]


def save_plan(jobs: list[Job], path: Path) -> None:
    path.write_text(json.dumps([asdict(job) for job in jobs]))


def load_plan(path: Path) -> list[Job]:
    raw = json.loads(path.read_text())
    return [Job(**{**item, "producers": tuple(item["producers"])}) for item in raw]


def run_body(ledger: EffectLedger, key: str, ms: int, fenced: bool, cpu: bool = False) -> str:
    """The task body: half its time, one side effect (and a fenced write), the other half.

    Called inside the guard, so ``ledger.body()`` records the key, the attempt and the
    fencing token; a kill lands before, between or after the effects depending on timing.
    The effect is done the run's way (``IDTCHAOS_EFFECTS``, see ``effects``); ``effect_done``
    then tells the runner that a kill from here on falls between effect and completion.
    A ``cpu`` body spins instead of sleeping: the lease keeper thread only runs when the
    interpreter hands it the GIL.
    """
    wait = spin if cpu else time.sleep
    with ledger.body():
        wait(ms / 2000)
        effects.do_effect(ledger, env("EFFECTS", "plain"), fenced, env("SQL_URL", ""))
        ledger.effect_done()
        wait(ms / 2000)
    return key


def spin(seconds: float) -> None:
    """Pure-Python work for ``seconds``: holds the GIL but for the interpreter's switches."""
    end = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < end:
        for _ in range(1000):
            count += 1


def linger(ledger: EffectLedger, key: str) -> None:
    """Between the recorded completion and the ack: tell the runner (``acking``) and wait, so
    a scheduled kill can land in this window."""
    ledger.record("acking", key=key)
    time.sleep(LINGER)


def env(name: str, default: str | None = None) -> str:
    """A setting of this run, from ``IDTCHAOS_<NAME>``."""
    value = os.environ.get(ENV_PREFIX + name, default)
    if value is None:
        raise RuntimeError(f"{ENV_PREFIX}{name} is not set: start this through the runner")
    return value


def result_ttl() -> float:
    """The workers' ``result_ttl`` (an hour unless the scenario makes it short)."""
    return float(env("RESULT_TTL", "3600"))


def ledger_from_env() -> EffectLedger:
    return EffectLedger.from_url(env("LEDGER_URL"), env("LEDGER_NAME"))
