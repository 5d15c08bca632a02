"""``python -m benchmarks [--quick] [--json PATH] [--plot PATH] [--only SECTION ...]``

Runs every section, prints the figures next to their targets as a Markdown table and
writes everything measured (each run of each round, the machine, the load) as JSON.
Meanwhile standard error shows the section, the round, the runs done and the time left:
a bar on a terminal, plain lines otherwise (``idemtask.testing.progress``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Servers, load_average, machine, servers
from benchmarks.report import render
from idemtask.testing.progress import Progress

SECTIONS = (
    "keys",
    "memory",
    "commands",
    "enqueue",
    "execute",
    "steps",
    "busy",
    "celery",
    "dramatiq",
    "storecalls",
)


@dataclass(frozen=True)
class Sizes:
    celery_calls: int = 800
    celery_rounds: int = 5
    dramatiq_calls: int = 1500
    dramatiq_rounds: int = 5
    latency_calls: int = 200
    enqueue_calls: int = 2000
    execute_calls: int = 1000
    step_calls: int = 1000
    command_tasks: int = 200
    memory_records: int = 100_000
    key_loops: int = 2000
    busy_rounds: int = 20
    store_calls: int = 5000


FULL = Sizes()
QUICK = Sizes(
    celery_calls=200,
    celery_rounds=3,
    dramatiq_calls=300,
    dramatiq_rounds=3,
    latency_calls=40,
    enqueue_calls=300,
    execute_calls=200,
    step_calls=200,
    command_tasks=20,
    memory_records=10_000,
    key_loops=500,
    busy_rounds=4,
    store_calls=1000,
)

#: How each section runs: without servers (``None``) or with the benchmark's two servers;
#: the long ones show their rounds and runs on the progress.
Runner = Callable[[Servers | None, Sizes, Progress], Any]


def _runners() -> dict[str, Runner]:
    """Imported on use: the end-to-end modules pull in both frameworks."""
    from benchmarks import busy_latency, celery_e2e, commands, dramatiq_e2e, memory, percall, steps
    from benchmarks.store_calls import bench_store_calls

    def served(found: Servers | None) -> Servers:
        assert found is not None
        return found

    return {
        "keys": lambda _, s, p: percall.bench_keys(number=s.key_loops),
        "memory": lambda _, s, p: memory.bench_memory(s.memory_records),
        "commands": lambda f, s, p: commands.bench_commands(served(f), s.command_tasks),
        "enqueue": lambda f, s, p: percall.bench_enqueue(served(f), s.enqueue_calls),
        "execute": lambda f, s, p: percall.bench_execute(served(f), s.execute_calls),
        "steps": lambda f, s, p: steps.bench_steps(served(f), s.step_calls),
        "busy": lambda _, s, p: busy_latency.run(rounds=s.busy_rounds, progress=p),
        "celery": lambda f, s, p: celery_e2e.bench_celery(
            served(f), s.celery_calls, s.celery_rounds, s.latency_calls, p
        ),
        "dramatiq": lambda f, s, p: dramatiq_e2e.bench_dramatiq(
            served(f), s.dramatiq_calls, s.dramatiq_rounds, s.latency_calls, p
        ),
        "storecalls": lambda f, s, p: bench_store_calls(served(f), s.store_calls, progress=p),
    }


#: Sections that need none of the shared servers (``busy`` starts its own), run first.
SERVERLESS = ("keys", "memory", "busy")


def run(sizes: Sizes, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Every requested section, in ``SECTIONS`` order (those without servers first); the
    return value is what the JSON file holds."""
    runners = _runners()
    results: dict[str, Any] = {"machine": machine(), "sizes": asdict(sizes)}
    chosen = [name for name in SECTIONS if name in sections]
    serverless = [name for name in chosen if name in SERVERLESS]
    served = [name for name in chosen if name not in SERVERLESS]
    order = serverless + served

    seconds: dict[str, float] = {}

    def step(name: str, found: Servers | None, progress: Progress) -> None:
        section = f"{order.index(name) + 1}/{len(order)} {name}"
        progress.begin(section=section, round=None, variant=None)
        started = time.monotonic()
        results[name] = runners[name](found, sizes, progress)
        seconds[name] = time.monotonic() - started
        progress.write(f"   {name}: {seconds[name]:.0f} s", file=sys.stderr)

    with Progress() as progress:
        for name in serverless:
            step(name, None, progress)
        if served:
            with servers() as found:
                for name in served:
                    step(name, found, progress)
    results["section_seconds"] = seconds
    results["machine"]["load_at_end"] = load_average()
    results["machine"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("build") / "benchmarks.json",
        help="where to write the raw figures (default: build/benchmarks.json, under the "
        "current directory)",
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument(
        "--plot",
        type=Path,
        help="also draw the throughput ratios against body duration to this PNG (the docs' "
        "figure is docs/img/benchmark-throughput.png)",
    )
    options = parser.parse_args(argv)
    sizes = QUICK if options.quick else FULL
    results = run(sizes, tuple(options.only or SECTIONS))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(render(results))
    print(f"\nraw figures: {options.json}")
    if options.plot is not None:
        from benchmarks.plot import plot_throughput

        if plot_throughput(results, options.plot):
            print(f"throughput plot: {options.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
