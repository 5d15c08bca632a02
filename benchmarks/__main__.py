"""``python -m benchmarks [--quick] [--json PATH] [--only SECTION ...]``

Runs every section, prints the figures next to their targets as a Markdown table and
writes everything measured (each run of each round, the machine, the load) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import load_average, machine, servers
from benchmarks.report import render

SECTIONS = ("keys", "enqueue", "execute", "steps", "commands", "memory", "celery", "dramatiq")


@dataclass(frozen=True)
class Sizes:
    celery_calls: int = 5000
    celery_rounds: int = 5
    dramatiq_calls: int = 5000
    dramatiq_rounds: int = 5
    enqueue_calls: int = 2000
    execute_calls: int = 1000
    step_calls: int = 1000
    command_tasks: int = 200
    memory_records: int = 100_000
    key_loops: int = 2000


FULL = Sizes()
QUICK = Sizes(
    celery_calls=1000,
    celery_rounds=3,
    dramatiq_calls=1000,
    dramatiq_rounds=3,
    enqueue_calls=300,
    execute_calls=200,
    step_calls=200,
    command_tasks=20,
    memory_records=10_000,
    key_loops=500,
)


def run(sizes: Sizes, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Every requested section; the return value is what the JSON file holds."""
    from benchmarks import celery_e2e, commands, dramatiq_e2e, memory, percall, steps

    results: dict[str, Any] = {"machine": machine(), "sizes": asdict(sizes)}

    def step(name: str) -> bool:
        if name in sections:
            print(f"== {name}", file=sys.stderr, flush=True)
            return True
        return False

    if step("keys"):
        results["keys"] = percall.bench_keys(number=sizes.key_loops)
    if step("memory"):
        results["memory"] = memory.bench_memory(sizes.memory_records)
    with servers() as found:
        if step("commands"):
            results["commands"] = commands.bench_commands(found, sizes.command_tasks)
        if step("enqueue"):
            results["enqueue"] = percall.bench_enqueue(found, sizes.enqueue_calls)
        if step("execute"):
            results["execute"] = percall.bench_execute(found, sizes.execute_calls)
        if step("steps"):
            results["steps"] = steps.bench_steps(found, sizes.step_calls)
        if step("celery"):
            results["celery"] = celery_e2e.bench_celery(
                found, sizes.celery_calls, sizes.celery_rounds
            )
        if step("dramatiq"):
            results["dramatiq"] = dramatiq_e2e.bench_dramatiq(
                found, sizes.dramatiq_calls, sizes.dramatiq_rounds
            )
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
    options = parser.parse_args(argv)
    sizes = QUICK if options.quick else FULL
    results = run(sizes, tuple(options.only or SECTIONS))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(render(results))
    print(f"\nraw figures: {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
