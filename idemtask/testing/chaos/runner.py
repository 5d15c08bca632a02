"""Run one chaos scenario end to end and measure it from the effect ledger.

A scenario starts its own servers (a Redis broker, or none: the RabbitMQ scenario runs on
the caller's node; the store's ``redis-server`` with the append-only file on, a second
``redis-server`` for the ledger), real worker processes and two
producer processes, injects a seeded schedule of faults while the workload runs, waits until
every key is completed and the system has gone quiet, then analyses the ledger with
``analyse`` and reads every key's record back from the store.

Faults (each written to the ledger):

* ``kill``: SIGKILL of a worker process that is inside a body (a Celery pool child, or a
  Dramatiq worker process, which the runner replaces, as a supervisor would);
* ``kill_after_end``: SIGKILL of a process after its body's completion was recorded and
  before the broker ack (the jobs planned to linger wait there);
* ``kill_after_effect``: SIGKILL of a process whose body did its side effect (see
  ``effects``: plain, in a step, or committed through ``idemtask.sql``) and has not
  returned: the window between effect and completion;
* ``stop``: SIGSTOP of a process inside a body for longer than its lease and than the
  broker's redelivery delay, then SIGCONT: another worker takes the key over, and the frozen
  holder's completion must be rejected as stale;
* ``store_restart``: the store's ``redis-server`` stopped (alternately SIGTERM and SIGKILL),
  down for a second, and started again on its append-only file;
* ``broker_restart``: RabbitMQ stopped and started again (RabbitMQ scenario, on the
  caller's node);
* ``oom``, ``readonly``, ``misconf``: the store keeps answering, but refuses writes with
  an error reply for ``error_seconds`` (see ``ErrorReplies``);
* ``latency``, ``drop``, ``blackhole``: network faults between the workers and the store,
  whose URL then points at a ``FaultyProxy`` in front of it: ``latency_ms`` more per chunk
  for ``net_seconds``, every connection closed (and new ones refused) for ``net_seconds``,
  or nothing forwarded for ``blackhole_seconds`` (longer than the store client's 5 s socket
  timeout by default, so calls time out).

The workload can also hold bodies longer than ``result_ttl`` (``long_bodies``; set a short
``result_ttl``) and bodies that spin in pure Python, holding the GIL, for longer than the
lease (``cpu_bodies``): the lease keeper thread must still renew.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idemtask.store.base import State
from idemtask.store.redis import RedisStore
from idemtask.testing.chaos import effects, workload
from idemtask.testing.chaos.broker import Broker
from idemtask.testing.checks import TTL_SLACK, Report, analyse
from idemtask.testing.faults import ErrorReplies, Faults, children
from idemtask.testing.launcher import LOOPBACK, RedisServer, terminate_session
from idemtask.testing.ledger import EffectLedger, Entry
from idemtask.testing.progress import Progress
from idemtask.testing.proxy import FaultyProxy

#: Seconds without a RabbitMQ heartbeat after which the server drops a frozen consumer:
#: the client asks for this interval, the server closes after about two missed beats.
RABBITMQ_HEARTBEAT = 2
#: Dramatiq's RedisBroker heartbeat timeout used by the scenario (see dramatiq_app).
REDIS_BROKER_HEARTBEAT = 3.0
#: A process continued after a stop is not killed again for this long, so that the stale
#: completion of its frozen body is seen (a kill would hide it).
SPARE_AFTER_CONT = 4.0
#: Seconds a RabbitMQ restart usually takes here (it blocks the fault schedule).
BROKER_RESTART_ESTIMATE = 10.0
#: How long an ``acking`` entry counts as "lingering now" (the linger is 0.3 s).
ACKING_WINDOW = 0.2
#: A body is a target for a kill or a stop while it has at least this long left to run.
BODY_MARGIN = 0.05
#: The same for a kill between effect and completion: the body's end by the plan is a lower
#: bound of its real end, so only the time from the look to the kill needs covering.
AFTER_EFFECT_MARGIN = 0.01
#: Faults that refuse the store's writes with an error reply, and network faults.
ERROR_FAULTS = ErrorReplies.KINDS
NET_FAULTS = ("latency", "drop", "blackhole")
#: Kills and stops need a body to hit.
HIT_FAULTS = ("kill", "stop", "kill_after_end", "kill_after_effect")

#: Figures from the ledger's ``effect`` entries, which ``sql`` mode does not write.
LEDGER_EFFECT_FIGURES = (
    "repeated effects not explained by a crash",
    "repeated effects after a kill",
    "repeated effects by a holder whose lease was lost",
    "repeated effects after a run that ended unrecorded",
)

Log = Callable[[str], None]


@dataclass
class Scenario:
    """What to run. ``kills`` includes ``kills_after_end`` and ``kills_after_effect``; faults
    and submissions are spread over ``duration`` seconds. ``effects`` is how the body does
    its side effect (``effects.MODES``); ``sql`` mode writes to ``sql_url``, by default a
    SQLite file in the run's directory."""

    framework: str  # "celery" or "dramatiq"
    broker: str = "redis"  # "redis", or "rabbitmq" for Dramatiq
    keys: int = 60
    seed: int = 1
    kills: int = 3
    kills_after_end: int = 1
    kills_after_effect: int = 0
    stops: int = 1
    store_restarts: int = 1
    broker_restarts: int = 0
    ooms: int = 0
    readonlys: int = 0
    misconfs: int = 0
    latencies: int = 0
    drops: int = 0
    blackholes: int = 0
    long_bodies: int = 0  # keys whose body runs 1.5 x result_ttl
    cpu_bodies: int = 0  # keys whose body spins (holding the GIL) for 1.5 x the lease
    duration: float = 20.0
    lease: float = 2.0
    result_ttl: float = 3600.0
    visibility: float = 6.0  # Celery's Redis visibility timeout
    error_seconds: float = 1.5  # how long an error-reply fault refuses writes
    net_seconds: float = 3.0  # how long latency lasts, and drops refuse connections
    latency_ms: float = 150.0
    blackhole_seconds: float = 6.0
    timeout: float = 600.0  # give up (and report the keys not completed) after this
    workdir: Path | None = None
    effects: str = "plain"
    sql_url: str | None = None

    def __post_init__(self) -> None:
        if (self.framework, self.broker) not in SCENARIOS:
            raise ValueError(f"no scenario {self.framework}/{self.broker}; have {SCENARIOS}")
        if self.broker_restarts and self.broker != "rabbitmq":
            raise ValueError("broker restarts are part of the RabbitMQ scenario only")
        if self.kills_after_end + self.kills_after_effect > self.kills:
            raise ValueError("kills_after_end and kills_after_effect are part of kills")
        if self.effects not in effects.MODES:
            raise ValueError(f"no effects mode {self.effects!r}; have {effects.MODES}")
        if self.sql_url and self.effects != "sql":
            raise ValueError("sql_url is for the sql effects mode")
        if self.result_ttl < self.lease:
            raise ValueError("result_ttl must be at least the lease")
        if self.long_bodies + self.cpu_bodies > self.keys:
            raise ValueError("long_bodies and cpu_bodies are part of keys")

    @property
    def proxied(self) -> bool:
        """Workers reach the store through the fault proxy (when a network fault is due)."""
        return self.latencies + self.drops + self.blackholes > 0

    @property
    def hit_after(self) -> float:
        """How long a body must have run to be killed or stopped: with bodies longer than
        ``result_ttl``, only those past it, whose record lives on renewals alone."""
        return self.result_ttl if self.long_bodies else 0.0

    @property
    def special(self) -> workload.Special:
        return workload.Special(
            long=self.long_bodies,
            long_ms=int(self.result_ttl * 1500),
            cpu=self.cpu_bodies,
            cpu_ms=int(self.lease * 1500),
        )

    @property
    def name(self) -> str:
        return f"{self.framework}-{self.broker}"

    @property
    def redelivery_delay(self) -> float:
        """Seconds until the broker hands a frozen or dead worker's message to another."""
        if self.framework == "celery":
            return self.visibility + 1.0  # + the unacked restore interval
        if self.broker == "redis":
            return REDIS_BROKER_HEARTBEAT + 1.0
        return 3 * RABBITMQ_HEARTBEAT

    @property
    def stop_seconds(self) -> float:
        """Long enough for the lease to run out and the message to reach another worker."""
        return self.redelivery_delay + self.lease + 3.0

    @property
    def quiet(self) -> float:
        """Seconds without a ledger entry after which the run is over: any redelivery still
        due would have come by then."""
        return self.redelivery_delay + self.lease + 2.0

    @property
    def fault_interval(self) -> float:
        """Seconds from one fault's end to the next one's being due (the first is due after
        half of it). The faults fill the first 70 % of the submissions' span, so that even
        the last one meets bodies running; the time the faults that hold the schedule last
        (broker restarts, error replies) comes out of that span. A stopped process is
        continued from the loop, and network faults end by themselves: neither holds it."""
        held = self.broker_restarts * BROKER_RESTART_ESTIMATE
        held += (self.ooms + self.readonlys + self.misconfs) * self.error_seconds
        return max(0.5, (0.7 * self.duration - held) / max(1, len(self.schedule())))

    def schedule(self) -> list[str]:
        """The faults in their order of preference: kills between completion and ack first
        (their target, a lingering delivery, is the rarest), then kills between effect and
        completion, then kills and stops in a seeded order, server restarts last.

        Kills and stops need a body to hit, and bodies thin out towards the end of a run (the
        last submissions are mostly copies of completed keys, which are replayed); restarts
        need no target. When a fault is due, the first one in this order that has a target
        goes.
        """
        rng = random.Random(f"schedule-{self.seed}")
        mid_body = self.kills - self.kills_after_end - self.kills_after_effect
        hits = ["kill"] * mid_body + ["stop"] * self.stops
        restarts = ["store_restart"] * self.store_restarts
        restarts += ["broker_restart"] * self.broker_restarts
        rng.shuffle(hits)
        rng.shuffle(restarts)
        # The store and network faults need no target either; their own seeded order, then
        # shuffled in among the restarts (the restarts keep their order of before).
        others = ["oom"] * self.ooms + ["readonly"] * self.readonlys
        others += ["misconf"] * self.misconfs + ["latency"] * self.latencies
        others += ["drop"] * self.drops + ["blackhole"] * self.blackholes
        random.Random(f"store-faults-{self.seed}").shuffle(others)
        for fault in others:
            restarts.insert(rng.randrange(len(restarts) + 1), fault)
        aimed = ["kill_after_end"] * self.kills_after_end
        aimed += ["kill_after_effect"] * self.kills_after_effect
        return aimed + hits + restarts


SCENARIOS = (("celery", "redis"), ("dramatiq", "redis"), ("dramatiq", "rabbitmq"))


@dataclass
class Result:
    """What a scenario did and what the ledger and the store say about it."""

    scenario: str
    seed: int
    keys: int
    messages: int  # submissions accepted by the broker
    seconds: float
    faults: Counter[str]
    skipped_faults: list[str]
    report: Report
    store_not_done: list[str]  # keys whose record is not ``done`` at the end
    sends_refused: int = 0  # producer sends that raised (and were retried)
    fault_log: list[str] = field(default_factory=list)
    effects: str = "plain"
    #: ``sql`` mode: the user table's rows per key at the end (the committed effects).
    effect_rows: dict[str, int] | None = None
    #: ``sql`` mode: keys submitted but without a committed effect row.
    database_missing: list[str] = field(default_factory=list)

    @property
    def database_repeats(self) -> list[str]:
        """``sql`` mode: keys with more than one committed effect row."""
        rows = self.effect_rows or {}
        return [f"{key}: {n} rows" for key, n in sorted(rows.items()) if n > 1]

    def figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "scenario": self.scenario,
            "effects": self.effects,
            "seed": self.seed,
            "keys": self.keys,
            "messages": self.messages,
            "seconds": round(self.seconds, 1),
            "kills mid-body": self.faults["kill"],
            "kills between completion and ack": self.faults["kill_after_end"],
            "kills aimed between effect and completion": self.faults["kill_after_effect"],
            "stops": self.faults["stop"],
            "store restarts": self.faults["store_restart"],
            "broker restarts": self.faults["broker_restart"],
            "OOM replies": self.faults["oom"],
            "READONLY replies": self.faults["readonly"],
            "MISCONF replies": self.faults["misconf"],
            "latency spells": self.faults["latency"],
            "connection drops": self.faults["drop"],
            "black holes": self.faults["blackhole"],
            "faults skipped (no target)": len(self.skipped_faults),
            "sends refused (retried by the producer)": self.sends_refused,
            "store records not done": len(self.store_not_done),
        }
        figures.update(self.report.as_dict())
        if self.effect_rows is not None:
            # The effect is the committed row, not a ledger entry (see ``effects``): the
            # ledger's effect figures would count nothing.
            for name in LEDGER_EFFECT_FIGURES:
                figures.pop(name)
            figures["database effect rows"] = sum(self.effect_rows.values())
            figures["repeated effects"] = len(self.database_repeats)
            figures["keys without an effect row"] = len(self.database_missing)
        return figures

    @property
    def violations(self) -> dict[str, list[str]]:
        """Every broken guarantee, by name; empty when the run was clean."""
        report = self.report
        found = {
            "lost": report.lost,
            "store records not done": self.store_not_done,
            "overlaps": report.overlaps,
            "runs after completion": report.runs_after_completion,
            "double completions": report.double_completions,
            "stale completions accepted": report.stale_accepted,
            "repeats not explained by a crash": report.unexplained_repeats,
            "stale fenced writes accepted": report.stale_fenced_writes_accepted,
            "token regressions": report.token_regressions,
            "deliveries acked without a run or a replay": report.acked_without_run,
            "repeated database effects": self.database_repeats,
            "keys without an effect row": self.database_missing,
        }
        return {name: items for name, items in found.items() if items}


class _Follower:
    """Reads the ledger as it grows: who is inside a body, who is between completion and
    ack, which keys are completed."""

    def __init__(self, ledger: EffectLedger, body_seconds: dict[str, float]) -> None:
        self.ledger = ledger
        self.body_seconds = body_seconds  # the plan's body length, by the plan's key name
        self.read = 0
        self.length: dict[str, float] = {}  # body length by the guard's key
        self.bodies: dict[int, dict[str, float]] = {}  # pid -> key -> start of its body
        self.acking: dict[int, float] = {}
        self.effect_done: dict[int, set[str]] = {}  # pid -> keys whose running body did it
        self.completed: set[str] = set()
        self.submitted = 0
        self.producers_done = 0
        self.ready: set[int] = set()
        self.changed = time.monotonic()

    def poll(self) -> None:
        new = self.ledger.entries(self.read)
        if not new:
            return
        self.read += len(new)
        self.changed = time.monotonic()
        for entry in new:
            self._take(entry)

    def _take(self, entry: Entry) -> None:
        kind = entry.kind
        if kind == "start":
            self.bodies.setdefault(entry.pid, {})[entry.key] = entry.at
        elif kind == "end":
            self.bodies.get(entry.pid, {}).pop(entry.key, None)
            self.effect_done.get(entry.pid, set()).discard(entry.key)
        elif kind == "effect_done":
            self.effect_done.setdefault(entry.pid, set()).add(entry.key)
        elif kind == "killed":
            self.bodies.pop(entry.pid, None)
            self.acking.pop(entry.pid, None)
            self.effect_done.pop(entry.pid, None)
        elif kind == "acking":
            self.acking[entry.pid] = entry.at
        elif kind in ("completed", "replayed"):
            # A replay proves a completion whose own entry may have died with its process.
            self.completed.add(entry.key)
        elif kind == "submitted":
            self.submitted += 1
            self.length[entry.key] = self.body_seconds.get(entry.attempt, 0.0)
        elif kind == "producer_done":
            self.producers_done += 1
        elif kind == "ready":
            self.ready.add(entry.pid)

    def in_body(self, pids: list[int], ran: float = 0.0) -> list[int]:
        """Processes with a body that, by the plan, still has ``BODY_MARGIN`` to run: the
        ledger is read a little late, and a body about to end would make a kill or a stop
        land after its completion instead of inside it. With ``ran``, only bodies that have
        been running for longer than that count."""
        now = time.time()
        return [
            pid
            for pid in pids
            if any(
                started + self.length.get(key, 0.0) - now > BODY_MARGIN and now - started > ran
                for key, started in self.bodies.get(pid, {}).items()
            )
        ]

    def after_effect(self, pids: list[int]) -> list[int]:
        """Processes with a body that did its effect and, by the plan, still has
        ``AFTER_EFFECT_MARGIN`` to run: a kill now lands between effect and completion."""
        now = time.time()
        return [
            pid
            for pid in pids
            if any(
                started + self.length.get(key, 0.0) - now > AFTER_EFFECT_MARGIN
                for key, started in self.bodies.get(pid, {}).items()
                if key in self.effect_done.get(pid, set())
            )
        ]

    def lingering(self, pids: list[int]) -> list[int]:
        now = time.time()
        return [pid for pid in pids if now - self.acking.get(pid, 0.0) < ACKING_WINDOW]


class ChaosRun:
    """One scenario's servers, processes and fault loop. Use ``run_scenario``."""

    def __init__(
        self,
        scenario: Scenario,
        log: Log,
        rabbitmq: Broker | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.scenario = scenario
        self.log = log
        self.progress = progress or Progress.off()
        self.dir = scenario.workdir or Path(tempfile.mkdtemp(prefix=f"idemtask-{scenario.name}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._own_dir = scenario.workdir is None
        self.namespace = f"chaos{uuid.uuid4().hex[:8]}"
        self.broker_redis: RedisServer | None = None
        self.rabbitmq = rabbitmq  # the caller's node (RabbitMQ scenario)
        # Protected configs on: the misconf fault moves the server's directory.
        self.store = RedisServer(
            appendonly=True, appendfsync="always", config={"enable-protected-configs": "yes"}
        )
        self.ledger_server = RedisServer()
        self.refusing_master: RedisServer | None = None  # for the readonly fault
        self.proxy: FaultyProxy | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.producers: list[subprocess.Popen[bytes]] = []
        self.faults_done: Counter[str] = Counter()
        self.skipped: list[str] = []
        self.fault_log: list[str] = []
        self.continued: dict[int, float] = {}
        self.stopped: dict[int, float] = {}  # frozen pid -> when to continue it
        self._store_crash = False
        self._started = time.monotonic()
        self.sql_url = ""
        if scenario.effects == "sql":
            self.sql_url = scenario.sql_url or effects.sqlite_url(self.dir)

    # -- set up ---------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        s = self.scenario
        if s.broker == "rabbitmq":
            assert self.rabbitmq is not None
            broker_url = f"{self.rabbitmq.url}%2F?heartbeat={RABBITMQ_HEARTBEAT}"
            backend_url = ""
        else:
            assert self.broker_redis is not None
            broker_url = self.broker_redis.url
            backend_url = self.broker_redis.url.rsplit("/", 1)[0] + "/1"
        pace = s.duration / max(1, s.keys * workload.SUBMISSIONS / workload.PRODUCERS)
        values = {
            "FRAMEWORK": s.framework,
            "BROKER": s.broker,
            "BROKER_URL": broker_url,
            "BACKEND_URL": backend_url,
            "STORE_URL": self.proxy.url if self.proxy is not None else self.store.url,
            "RESULT_TTL": str(s.result_ttl),
            "LEDGER_URL": self.ledger.url,
            "LEDGER_NAME": self.ledger.name,
            "LEASE": str(s.lease),
            "VISIBILITY": str(s.visibility),
            "QUEUE": f"chaos-{self.namespace}",
            "NAMESPACE": self.namespace,
            "SEED": str(s.seed),
            "PACE": f"{pace:.6f}",
            "EFFECTS": s.effects,
            "SQL_URL": self.sql_url,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith(workload.ENV_PREFIX)}
        env.update({workload.ENV_PREFIX + k: v for k, v in values.items()})
        return env

    def _spawn(self, command: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with (self.dir / log_name).open("ab") as log:
            return subprocess.Popen(
                command,
                cwd=self.dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> None:
        s = self.scenario
        self.ledger_server.start()
        self.ledger = EffectLedger(self.ledger_server.client(), f"chaos-ledger-{self.namespace}")
        jobs = workload.plan(s.keys, s.seed, s.special)
        self.follow = _Follower(self.ledger, {job.key: job.ms / 1000 for job in jobs})
        self.faults = Faults(self.ledger, seed=s.seed)
        if self.sql_url:
            effects.prepare(self.sql_url)
        self.store.start()
        self._start_store_faults()
        if s.broker == "rabbitmq":
            if self.rabbitmq is None:
                raise ValueError("the RabbitMQ scenario needs a running node: pass rabbitmq=")
        else:
            self.broker_redis = RedisServer().start()
        if s.framework == "celery":
            self._start_celery()
        else:
            for _ in range(2):
                self._start_dramatiq_worker()
        plan_file = self.dir / "plan.json"
        workload.save_plan(jobs, plan_file)
        for index in range(workload.PRODUCERS):
            self.producers.append(
                self._spawn(
                    [
                        sys.executable,
                        "-m",
                        "idemtask.testing.chaos.producer",
                        str(plan_file),
                        str(index),
                    ],
                    f"producer-{index}.log",
                )
            )
        self._started = time.monotonic()

    def _start_store_faults(self) -> None:
        s = self.scenario
        if s.readonlys:
            # A real master the store cannot sync from: it requires a password the store
            # lacks, so the store stays a read-only replica that keeps its own data.
            self.refusing_master = RedisServer().start()
            client = self.refusing_master.client()
            client.config_set("requirepass", uuid.uuid4().hex)
            client.close()
        if s.proxied:
            lifetime = s.timeout + 600  # the proxy stops by itself after the run
            self.proxy = FaultyProxy(self.store.port, lifetime=lifetime).start()

    def _start_celery(self) -> None:
        log = self.dir / "celery-worker.log"
        proc = self._spawn(
            [
                sys.executable, "-m", "celery", "-A", "idemtask.testing.chaos.celery_app",
                "worker", "--pool=prefork", "-c", "2", "--loglevel=INFO",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "-Q", f"chaos-{self.namespace}", f"--logfile={log}",
            ],
            "celery-stdout.log",
        )  # fmt: skip
        self.workers.append(proc)
        deadline = time.monotonic() + 60
        while not (log.exists() and "ready." in log.read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Celery worker did not start; see {self.dir}")
            time.sleep(0.1)

    def _start_dramatiq_worker(self) -> None:
        proc = self._spawn(
            [sys.executable, "-m", "idemtask.testing.chaos.dramatiq_app"],
            f"dramatiq-worker-{len(self.workers)}.log",
        )
        self.workers.append(proc)
        deadline = time.monotonic() + 60
        while proc.pid not in self.follow.ready:
            self.follow.poll()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"a Dramatiq worker did not start; see {self.dir}")
            time.sleep(0.05)

    # -- the loop -------------------------------------------------------------------------

    def body_pids(self) -> list[int]:
        """Processes that run bodies: Celery's pool children, or the Dramatiq workers."""
        if self.scenario.framework == "celery":
            return children(self.workers[0].pid)
        return [p.pid for p in self.workers if p.poll() is None]

    def _targets(self) -> list[int]:
        now = time.monotonic()
        return [
            pid
            for pid in self.body_pids()
            if pid not in self.stopped and now - self.continued.get(pid, -1e9) > SPARE_AFTER_CONT
        ]

    def _keep_workers(self) -> None:
        """A killed Dramatiq worker process is replaced (Celery's parent replaces its
        children itself)."""
        if self.scenario.framework == "celery":
            if self.workers[0].poll() is not None:
                raise RuntimeError(f"the Celery worker parent died; see {self.dir}")
            return
        for proc in list(self.workers):
            if proc.poll() is not None:
                self.workers.remove(proc)
                self._start_dramatiq_worker()

    def _note(self, text: str) -> None:
        line = f"{time.monotonic() - self._started:7.1f}s {text}"
        self.fault_log.append(line)
        self.log(line)

    def _wait(self, seconds: float) -> None:
        """Sleep while following the ledger and continuing the stopped processes due."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.follow.poll()
            self._continue_due()
            time.sleep(0.02)

    def inject(self, fault: str) -> bool:
        """Try one fault; False when it has no target right now."""
        self.follow.poll()
        if fault in HIT_FAULTS:
            targets = self._targets()
            if fault == "kill_after_end":
                found = self.follow.lingering(targets)
            elif fault == "kill_after_effect":
                found = self.follow.after_effect(targets)
            else:
                found = self.follow.in_body(targets, self.scenario.hit_after)
            pid = self.faults.pick(sorted(found))
            if pid is None:
                return False
            if fault == "stop":
                self._stop(pid)
            else:
                self.faults.kill(pid)
                self._note(f"{fault} pid {pid}")
        elif fault == "store_restart":
            self._restart_store()
        elif fault == "broker_restart":
            assert self.rabbitmq is not None
            self.ledger.record("broker_restart", key="")
            began = time.monotonic()
            self.rabbitmq.restart()
            self._note(f"broker restart (down {time.monotonic() - began:.1f}s)")
        elif not self.follow.in_body(self._targets()):
            return False  # a store or network fault waits until a body is there to feel it
        elif fault in ERROR_FAULTS:
            self._refuse_writes(fault)
        else:
            self._net_fault(fault)
        self.faults_done[fault] += 1
        return True

    def _refuse_writes(self, kind: str) -> None:
        """The store answers writes with an error reply for ``error_seconds``, then is put
        back (also when the run is interrupted meanwhile)."""
        master = self.refusing_master
        client = self.store.client(socket_timeout=10)  # a new one: the store may have restarted
        errors = ErrorReplies(
            client,
            scratch=self.dir,
            refusing_master=None if master is None else (LOOPBACK, master.port),
            ledger=self.ledger,
        )
        errors.begin(kind)
        try:
            self._wait(self.scenario.error_seconds)
        finally:
            errors.end(kind)
            client.close()
        self._note(f"{kind} error replies for {self.scenario.error_seconds:.1f}s")

    def _net_fault(self, kind: str) -> None:
        """A network fault between the workers and the store; it ends by itself."""
        s, proxy = self.scenario, self.proxy
        assert proxy is not None
        self.ledger.record(kind, key="")
        if kind == "latency":
            proxy.add_latency(s.latency_ms, s.net_seconds)
            self._note(f"latency +{s.latency_ms:.0f}ms a chunk for {s.net_seconds:.1f}s")
        elif kind == "drop":
            proxy.drop(s.net_seconds)
            self._note(f"store connections dropped and refused for {s.net_seconds:.1f}s")
        else:
            proxy.black_hole(s.blackhole_seconds)
            self._note(f"store connections black-holed for {s.blackhole_seconds:.1f}s")

    def _stop(self, pid: int) -> None:
        """Freeze ``pid``; ``_continue_due`` wakes it, while the other faults go on."""
        self.faults.stop(pid)
        self.stopped[pid] = time.monotonic() + self.scenario.stop_seconds
        self._note(f"stop pid {pid} for {self.scenario.stop_seconds:.0f}s")

    def _continue_due(self) -> None:
        now = time.monotonic()
        for pid, due in list(self.stopped.items()):
            if now >= due:
                self.faults.cont(pid)
                del self.stopped[pid]
                self.continued[pid] = now

    def _restart_store(self) -> None:
        self.ledger.record("store_restart", key="")
        self._store_crash = not self._store_crash
        if self._store_crash:
            self.store.kill()  # SIGKILL: a crash; appendfsync always keeps every reply
        else:
            self.store.stop()  # SIGTERM: a clean shutdown
        self._wait(1.0)
        self.store.start()
        how = "SIGKILL" if self._store_crash else "SIGTERM"
        self._note(f"store restart ({how}, down 1s)")

    def loop(self) -> None:
        s = self.scenario
        pending = s.schedule()
        interval = s.fault_interval
        next_fault = time.monotonic() + interval / 2
        deadline = time.monotonic() + s.timeout
        expected_messages = s.keys * workload.SUBMISSIONS
        faults = len(pending)
        self.progress.begin("keys", s.keys, faults=f"0/{faults}")
        while True:
            self.follow.poll()
            self._continue_due()
            self._keep_workers()
            went = sum(self.faults_done.values())
            self.progress.update(len(self.follow.completed), faults=f"{went}/{faults}")
            now = time.monotonic()
            done = (
                self.follow.producers_done == workload.PRODUCERS
                and len(self.follow.completed) >= s.keys
                and self.follow.submitted >= expected_messages
            )
            if pending and now >= next_fault:
                # The first due fault that has a target goes: a rare target (a delivery
                # between completion and ack) does not hold back the others.
                injected = next((f for f in pending if self.inject(f)), None)
                if injected is not None:
                    next_fault = time.monotonic() + interval
                    pending.remove(injected)
                elif done:
                    # The workload is over: no body will run again to be hit.
                    for fault in pending:
                        self._note(f"{fault} skipped: no target left")
                    self.skipped.extend(pending)
                    pending.clear()
                else:
                    next_fault = now + 0.02  # no target yet: look again soon
                    time.sleep(0.01)
                continue
            if done and not pending and not self.stopped and now - self.follow.changed > s.quiet:
                return
            if now > deadline:
                self._note("timed out")
                return
            time.sleep(0.02)

    # -- results and tear down ------------------------------------------------------------

    def result(self) -> Result:
        entries = self.ledger.entries()
        keys = {e.key for e in entries if e.kind == "submitted"}
        report = analyse(entries, keys, result_ttl=self.scenario.result_ttl)
        rows = effects.rows_per_key(self.sql_url) if self.sql_url else None
        return Result(
            scenario=self.scenario.name,
            seed=self.scenario.seed,
            keys=len(keys),
            messages=sum(1 for e in entries if e.kind == "submitted"),
            seconds=time.monotonic() - self._started,
            faults=self.faults_done,
            skipped_faults=self.skipped,
            report=report,
            store_not_done=self._store_not_done(keys, entries),
            sends_refused=sum(1 for e in entries if e.kind == "send_failed"),
            fault_log=self.fault_log,
            effects=self.scenario.effects,
            effect_rows=rows,
            database_missing=sorted(keys - set(rows or {})) if rows is not None else [],
        )

    def _store_not_done(self, keys: set[str], entries: list[Entry]) -> list[str]:
        """Keys whose record is not ``done``; an absent record is fine once ``result_ttl``
        has passed since the key's last completion (the record ended, as documented)."""
        prefix = self.namespace if self.scenario.framework == "dramatiq" else "idemtask"
        done_at: dict[str, float] = {}
        for entry in entries:
            if entry.kind in ("completed", "replayed"):
                done_at[entry.key] = max(entry.at, done_at.get(entry.key, 0.0))
        ended = time.time() - self.scenario.result_ttl + TTL_SLACK
        self.store.start()
        store = RedisStore.from_url(self.store.url, prefix=prefix)
        try:
            not_done = []
            for key in sorted(keys):
                record = store.inspect(key)
                if record is None and done_at.get(key, float("inf")) < ended:
                    continue
                if record is None or record.state is not State.DONE:
                    not_done.append(f"{key}: {record.state.value if record else 'absent'}")
            return not_done
        finally:
            store.client.close()

    def close(self) -> None:
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for proc in self.producers + self.workers:
            terminate_session(proc)
        if self.proxy is not None:
            self.proxy.close()
        servers = (self.broker_redis, self.store, self.ledger_server)
        for server in (*servers, self.refusing_master):
            if server is not None:
                server.close()
        if self.sql_url:
            effects.dispose()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def _running(
    scenario: Scenario, log: Log, rabbitmq: Broker | None, progress: Progress | None
) -> Iterator[ChaosRun]:
    run = ChaosRun(scenario, log, rabbitmq, progress)
    try:
        run.start()
        yield run
    finally:
        run.close()


def run_scenario(
    scenario: Scenario,
    log: Log = print,
    rabbitmq: Broker | None = None,
    progress: Progress | None = None,
) -> Result:
    """Run ``scenario`` to the end and return its ``Result``. The RabbitMQ scenario runs on
    ``rabbitmq``, a node the caller started (see ``broker``), which it restarts.
    ``progress`` shows the keys completed and the faults injected while it runs."""
    with _running(scenario, log, rabbitmq, progress) as run:
        run.loop()
        run.progress.update(line=True, checking="the ledger and the store")
        result = run.result()
        (run.dir / "result.json").write_text(json.dumps(result.figures(), indent=2))
        if scenario.workdir is not None:  # the evidence, one JSON entry a line
            with (run.dir / "ledger.jsonl").open("w") as out:
                for entry in run.ledger.entries():
                    out.write(json.dumps(dataclasses.asdict(entry)) + "\n")
        return result
