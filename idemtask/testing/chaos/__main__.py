"""``python -m idemtask.testing.chaos``: run one chaos scenario and print its figures.

The RabbitMQ scenario runs on a node you run: ``--rabbitmq-url``, and ``--rabbitmq-restart``
for the command that restarts it (without one, the broker is not restarted).

While it runs, standard error shows the keys completed, the faults injected, the time
elapsed and an estimate of the time left: a bar on a terminal, a plain line every 10 s
otherwise (see ``idemtask.testing.progress``).

Exit status 0 when no guarantee was broken, 1 otherwise (the violations are printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from idemtask.testing.chaos.broker import Broker, ExternalRabbitMQ
from idemtask.testing.chaos.effects import MODES
from idemtask.testing.chaos.runner import Scenario, run_scenario
from idemtask.testing.progress import Progress

#: Faults per 10 000 keys in a long run, and the floor for smaller runs.
LONG_RUN = {"kills": 60, "kills_after_end": 15, "stops": 4, "restarts": 3}
#: The store's error replies and the network faults: how many of each in a long run.
STORE_FAULTS = {
    "ooms": "OOM error replies (maxmemory with noeviction)",
    "readonlys": "READONLY error replies (the store made a replica)",
    "misconfs": "MISCONF error replies (a failed BGSAVE)",
    "latencies": "spells of latency between workers and the store",
    "drops": "drops of every worker-to-store connection",
    "blackholes": "black holes between workers and the store",
}
LONG_RUN_STORE_FAULTS = 3


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m idemtask.testing.chaos",
        description="Run a workload under seeded faults on real servers and check that no "
        "key was lost, no two attempts overlapped, nothing ran after a completion, no "
        "stale completion was accepted, fencing tokens only grew and no delivery was acked "
        "without a run or a replay.",
    )
    parser.add_argument("--framework", choices=("celery", "dramatiq"), required=True)
    parser.add_argument(
        "--broker", choices=("redis", "rabbitmq"), default="redis", help="(Dramatiq only)"
    )
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kills", type=int, help=f"default {LONG_RUN['kills']}")
    parser.add_argument(
        "--kills-after-end",
        type=int,
        help=f"how many of the kills land between completion and ack "
        f"(default {LONG_RUN['kills_after_end']})",
    )
    parser.add_argument(
        "--kills-after-effect",
        type=int,
        default=0,
        help="how many of the kills are aimed between a body's effect and its completion "
        "(default %(default)s; the other mid-body kills land there by chance)",
    )
    parser.add_argument("--stops", type=int, help=f"default {LONG_RUN['stops']}")
    parser.add_argument(
        "--restarts",
        type=int,
        help=f"restarts of the store's Redis, and of RabbitMQ (default {LONG_RUN['restarts']})",
    )
    for name, what in STORE_FAULTS.items():
        parser.add_argument(
            f"--{name}",
            type=int,
            default=LONG_RUN_STORE_FAULTS,
            help=f"{what} (default %(default)s)",
        )
    parser.add_argument(
        "--long-bodies",
        type=int,
        default=0,
        help="keys whose body runs 1.5 x --result-ttl (give a short --result-ttl)",
    )
    parser.add_argument(
        "--cpu-bodies",
        type=int,
        default=0,
        help="keys whose body spins in pure Python, holding the GIL, for 1.5 x the lease",
    )
    parser.add_argument(
        "--result-ttl", type=float, default=3600.0, help="the workers' result_ttl in seconds"
    )
    parser.add_argument(
        "--error-seconds", type=float, default=1.5, help="how long an error-reply fault lasts"
    )
    parser.add_argument(
        "--blackhole-seconds", type=float, default=6.0, help="how long a black hole lasts"
    )
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds over which submissions and faults are spread (default 0.06 s a key)",
    )
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, help="give up after this (default 3x duration)")
    parser.add_argument("--workdir", type=Path, help="keep logs, plan and result.json here")
    parser.add_argument(
        "--effects",
        choices=MODES,
        default="plain",
        help="how the body does its side effect: recorded in the ledger (plain), inside "
        "idemtask.step (steps), or as a row written through idemtask.sql.atomic (sql)",
    )
    parser.add_argument(
        "--sql-url",
        help="SQLAlchemy URL of a scratch database for --effects sql (its tables "
        "idemtask_effects and idemtask_chaos_effects are emptied; default: a SQLite file in "
        "the run's directory)",
    )
    parser.add_argument(
        "--rabbitmq-url", help="AMQP URL of the running RabbitMQ node (--broker rabbitmq)"
    )
    parser.add_argument(
        "--rabbitmq-restart",
        metavar="COMMAND",
        help="command that restarts that node, for the broker restarts",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, rabbitmq: Broker | None = None) -> int:
    """Run the command; ``rabbitmq`` is a node the caller runs in place of ``--rabbitmq-url``."""
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.broker == "rabbitmq" and rabbitmq is None:
        if not args.rabbitmq_url:
            print("--broker rabbitmq needs --rabbitmq-url (a running node)", file=sys.stderr)
            return 2
        rabbitmq = ExternalRabbitMQ(args.rabbitmq_url, args.rabbitmq_restart)
        if not args.rabbitmq_restart:
            print("no --rabbitmq-restart: the broker is not restarted", flush=True)
    duration = args.duration if args.duration is not None else max(30.0, args.keys * 0.06)
    restarts = args.restarts if args.restarts is not None else LONG_RUN["restarts"]
    scenario = Scenario(
        framework=args.framework,
        broker=args.broker,
        keys=args.keys,
        seed=args.seed,
        kills=args.kills if args.kills is not None else LONG_RUN["kills"],
        kills_after_end=(
            args.kills_after_end
            if args.kills_after_end is not None
            else LONG_RUN["kills_after_end"]
        ),
        kills_after_effect=args.kills_after_effect,
        stops=args.stops if args.stops is not None else LONG_RUN["stops"],
        store_restarts=restarts,
        broker_restarts=restarts if args.broker == "rabbitmq" and _restartable(rabbitmq) else 0,
        **{name: getattr(args, name) for name in STORE_FAULTS},
        long_bodies=args.long_bodies,
        cpu_bodies=args.cpu_bodies,
        result_ttl=args.result_ttl,
        error_seconds=args.error_seconds,
        blackhole_seconds=args.blackhole_seconds,
        duration=duration,
        lease=args.lease,
        timeout=args.timeout if args.timeout is not None else max(300.0, 3 * duration),
        workdir=args.workdir,
        effects=args.effects,
        sql_url=args.sql_url,
    )
    # The fault timeline goes to standard output, the progress to standard error (a bar on
    # a terminal, a plain line now and then elsewhere); the figures follow once it is done.
    with Progress() as progress:
        result = run_scenario(scenario, log=progress.write, rabbitmq=rabbitmq, progress=progress)
    print(json.dumps(result.figures(), indent=2))
    for name, items in result.violations.items():
        print(f"VIOLATION {name}: {len(items)}", *items[:20], sep="\n  ")
    return 1 if result.violations else 0


def _restartable(broker: Broker | None) -> bool:
    return not isinstance(broker, ExternalRabbitMQ) or bool(broker.restart_command)


if __name__ == "__main__":
    sys.exit(main())
