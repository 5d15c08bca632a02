"""The benchmark suite at tiny sizes: it runs end to end against real servers and workers,
and the Redis command counts it reports hold. Timings are not asserted: on a shared
machine they are noise at these sizes; ``python -m benchmarks`` measures them properly."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` lives at the repository root, beside `idemtask`
    sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import Sizes, main, run  # noqa: E402
from benchmarks.body import BODIES_MS  # noqa: E402
from benchmarks.plot import plot_throughput  # noqa: E402
from benchmarks.report import render, rows  # noqa: E402
from benchmarks.variants import CELERY, DRAMATIQ  # noqa: E402

pytestmark = [pytest.mark.bench, pytest.mark.celery, pytest.mark.dramatiq, pytest.mark.slow]

TINY = Sizes(
    celery_calls=30,
    celery_rounds=1,
    dramatiq_calls=30,
    dramatiq_rounds=1,
    latency_calls=5,
    enqueue_calls=20,
    execute_calls=20,
    step_calls=20,
    command_tasks=10,
    memory_records=500,
    key_loops=20,
    busy_rounds=1,
    store_calls=20,
)


#: A plain progress line of a section that counts its runs or rounds.
COUNTED = r"section {n}/10 {name} (round \d+/\d+ |variant .+ )?{unit} \d+/(\d+) elapsed \S+ eta \S+"


@pytest.mark.timeout(240)
def test_every_section_runs_and_the_command_counts_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = run(TINY)

    # Standard error is no terminal here: the progress came as plain lines, one as each
    # section began, and those of the long sections with their rounds and count.
    progress = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"section 1/10 keys elapsed \S+", progress[0]), progress[0]
    e2e_runs = {  # each variant's warm-up, the throughput runs and the latency runs
        name: len(CELERY if name == "celery" else DRAMATIQ)
        + len(results[name]["throughput"])
        + len(results[name]["latency"])
        for name in ("celery", "dramatiq")
    }
    for n, name, unit, total in (
        (3, "busy", "rounds", len(results["busy"]["results"]) * TINY.busy_rounds),
        (8, "celery", "runs", e2e_runs["celery"]),
        (9, "dramatiq", "runs", e2e_runs["dramatiq"]),
        (10, "storecalls", "runs", len(results["storecalls"]["runs"])),
    ):
        pattern = COUNTED.format(n=n, name=name, unit=unit)
        totals = [int(m.group(2)) for m in map(re.compile(pattern).fullmatch, progress) if m]
        assert totals and set(totals) == {total}, (name, total, progress)

    # Every copy of the busy round got its answer (through a replay) and was counted.
    busy = results["busy"]
    assert [r["copies"] for r in busy["results"]] == [busy["duplicates"]] * len(busy["results"])

    commands = results["commands"]
    for path, expected in {
        "unique task": 3,
        "duplicate enqueue": 1,
        "cached replay": 1,
        "deferred duplicate": 1,
    }.items():
        assert commands[path]["sent"] == {"evalsha": expected * TINY.command_tasks}, path
    assert commands["celery-once unique task"]["sent_per_task"] == 2
    assert commands["celery-singleton unique task"]["sent_per_task"] == 2

    # End to end, counted on the store's server across publisher and worker processes, at
    # every body duration: 3 per unique task (reserve, acquire, complete), 1 per duplicate.
    for framework, calls in (("celery", TINY.celery_calls), ("dramatiq", TINY.dramatiq_calls)):
        runs = results[framework]["throughput"]
        assert {r["body_ms"] for r in runs} == set(BODIES_MS), framework
        for record in runs:
            if record["role"] == "plain":
                assert record["store_commands_sent"] == {}, record["variant"]
            elif record["role"] == "idemtask":
                duplicates = record["calls"] - calls
                assert record["executed"] == calls, record["variant"]
                assert record["store_commands_sent"] == {"evalsha": 3 * calls + duplicates}, record
            else:  # celery-once, celery-singleton: SET NX at enqueue, DEL when done
                assert record["store_commands_sent"] == {"set": calls, "del": calls}, record
            # the publisher and every watched process spent CPU
            assert record["publisher_cpu_seconds"] > 0, record["variant"]
            assert all(seconds > 0 for seconds in record["cpu_seconds"].values()), record
        twice = [r for r in runs if r["calls"] == 2 * calls]
        assert len(twice) == len(BODIES_MS), framework  # the duplicates variant, each body
        # the duplicates were metered on their own, the worker stopped: the servers only
        assert all(r["duplicates"] == calls for r in twice)
        assert all(set(r["duplicates_cpu_seconds"]) == {"worker", "broker", "store"} for r in twice)
        assert all(
            len(r["samples_us"]) == TINY.latency_calls for r in results[framework]["latency"]
        )

    # One step costs one more EVALSHA (its record; token 1 reads nothing) than a plain body.
    steps = results["steps"]["commands"]
    assert steps["plain body"]["sent"] == {"evalsha": 2 * TINY.step_calls}
    assert steps["one step"]["sent"] == {"evalsha": 3 * TINY.step_calls}

    # The store-call section measured every call path and the saving.
    summary = results["storecalls"]["summary"]
    assert set(summary) >= {"raw socket", "saved", "floor"}
    # the server's share is read from /proc: its scripts ran, so it spent some CPU on them
    assert summary["RedisStore acquire+complete, lean path"]["server_cpu_us_per_call"] > 0
    assert summary["floor"]["cpu_us_per_unique_task"] > 0

    memory = results["memory"]
    assert memory["bulk_sample_memory_usage"] == [memory["memory_usage_one_record"]]

    table = render(results)
    assert "IdempotentTask / plain Task throughput, 0 ms body" in table
    assert "Dramatiq whole-system CPU added per unique task" in table
    assert all(row.figure for row in rows(results))
    assert plot_throughput(results, tmp_path / "throughput.png")
    assert (tmp_path / "throughput.png").read_bytes().startswith(b"\x89PNG")


def test_the_command_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["--quick", "--only", "keys", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert [row["payload"] for row in figures["keys"]] == [
        "1 scalar",
        "5 arguments",
        "nested dict, 50 values",
    ]
    captured = capsys.readouterr()
    assert "key derivation, 5 arguments" in captured.out
    # the progress, off a terminal: plain lines on standard error, none in the report
    assert re.fullmatch(r"section 1/1 keys elapsed \S+", captured.err.splitlines()[0])
    assert "elapsed" not in captured.out


def test_the_benchmark_tasks_stay_in_their_own_apps() -> None:
    """Building the benchmark's Celery apps adds no task to any other app in the process:
    a shared task would show up in every app a test or the doctor looks at afterwards."""
    from celery import Celery

    from benchmarks.busy_apps import build_celery
    from benchmarks.celery_app import build_app

    url = "redis://127.0.0.1:1/0"  # nothing connects while the apps are built
    own, _ = build_app(url, url, url)
    busy = build_celery(url, url, url, url)
    other = Celery("other", broker="memory://", set_as_current=False)
    other.finalize()
    built = {name for name in (*own.tasks, *busy.tasks) if not name.startswith("celery.")}
    assert built and not built & set(other.tasks), sorted(built & set(other.tasks))
