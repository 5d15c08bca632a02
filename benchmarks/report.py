"""Turn the raw figures into the table of figures and targets (Markdown)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.common import median


@dataclass(frozen=True)
class Row:
    measure: str
    figure: str
    target: str
    met: bool | None  # None: shown for context, no target


def throughput(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per variant: median calls/s over its rounds, and the median of its per-round ratio
    to the first variant (the baseline, measured in the same round)."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["variant"]] = run["calls_per_second"]
    baseline = runs[0]["variant"] if runs else ""
    names = list(dict.fromkeys(run["variant"] for run in runs))
    summary = {}
    for name in names:
        rates = [r[name] for r in by_round.values() if name in r]
        ratios = [r[name] / r[baseline] for r in by_round.values() if name in r and baseline in r]
        summary[name] = {
            "median_calls_per_second": median(rates),
            "median_round_ratio": median(ratios),
            "rounds": len(rates),
        }
    return summary


def _ratio(summary: dict[str, dict[str, float]], name: str, baseline: str) -> float:
    return summary[name]["median_calls_per_second"] / summary[baseline]["median_calls_per_second"]


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    celery_runs = results.get("celery")
    if celery_runs:
        s = throughput(celery_runs)
        for name, values in s.items():
            out.append(
                Row(
                    f"Celery {name}: calls/s (median of {values['rounds']})",
                    f"{values['median_calls_per_second']:.0f}",
                    "",
                    None,
                )
            )
        unique, plain = "IdempotentTask, unique keys", "plain Task"
        ratio = _ratio(s, unique, plain)
        out.append(
            Row(
                "IdempotentTask / plain Task throughput (unique keys)",
                f"{ratio:.2f} (per-round median {s[unique]['median_round_ratio']:.2f})",
                "≥ 0.90",
                ratio >= 0.90,
            )
        )
        dup = "IdempotentTask, 50% duplicates"
        out.append(
            Row(
                "IdempotentTask with 50 % duplicates / plain Task (calls/s)",
                f"{_ratio(s, dup, plain):.2f}",
                "",
                None,
            )
        )
        for other in ("celery-once QueueOnce", "celery-singleton Singleton"):
            ratio = _ratio(s, unique, other)
            out.append(Row(f"IdempotentTask / {other}", f"{ratio:.2f}", "≥ 1.0", ratio >= 1.0))
    dramatiq_runs = results.get("dramatiq")
    if dramatiq_runs:
        s = throughput(dramatiq_runs)
        for name, values in s.items():
            out.append(
                Row(
                    f"Dramatiq {name}: calls/s (median of {values['rounds']})",
                    f"{values['median_calls_per_second']:.0f}",
                    "",
                    None,
                )
            )
        unique, plain = "IdempotencyMiddleware, unique keys", "plain actor"
        ratio = _ratio(s, unique, plain)
        out.append(
            Row(
                "Dramatiq middleware / plain actor throughput (unique keys)",
                f"{ratio:.2f} (per-round median {s[unique]['median_round_ratio']:.2f})",
                "≥ 0.90",
                ratio >= 0.90,
            )
        )
        dup = "IdempotencyMiddleware, 50% duplicates"
        out.append(
            Row(
                "Dramatiq middleware with 50 % duplicates / plain actor (calls/s)",
                f"{_ratio(s, dup, plain):.2f}",
                "",
                None,
            )
        )
    for key in results.get("keys", []):
        five = key["payload"] == "5 arguments"
        out.append(
            Row(
                f"key derivation, {key['payload']} (µs; celery-once "
                f"{key['celery_once_us']:.1f}, celery-singleton {key['celery_singleton_us']:.1f})",
                f"{key['idemtask_us']:.1f} (best batch {key['idemtask_best_us']:.1f})",
                "≤ 20" if five else "",
                key["idemtask_us"] <= 20 if five else None,
            )
        )
    enqueue = results.get("enqueue")
    if enqueue:
        for name in ("plain", "idempotent", "duplicate"):
            values = enqueue[name]
            out.append(
                Row(
                    f"apply_async {name} (µs p50 / p99)",
                    f"{values['p50_us']:.0f} / {values['p99_us']:.0f}",
                    "",
                    None,
                )
            )
        speedup = enqueue["plain"]["p50_us"] / enqueue["duplicate"]["p50_us"]
        versus_new = enqueue["idempotent"]["p50_us"] / enqueue["duplicate"]["p50_us"]
        out.append(
            Row(
                "duplicate enqueue speed-up over a real enqueue (p50, plain Task; "
                f"{versus_new:.1f}× over an IdempotentTask enqueue)",
                f"{speedup:.1f}×",
                "≥ 3×",
                speedup >= 3,
            )
        )
    execute = results.get("execute")
    if execute:
        out.append(
            Row(
                "worker trace per task, plain / IdempotentTask (µs p50)",
                f"{execute['plain_trace']['p50_us']:.0f} / "
                f"{execute['idempotent_trace']['p50_us']:.0f}",
                "",
                None,
            )
        )
        out.append(
            Row(
                "execute overhead per task (µs p50; guard in "
                f"{execute['guard_in_p50_us']:.0f}, guard out {execute['guard_out_p50_us']:.0f})",
                f"{execute['overhead_p50_us']:.0f}",
                "",
                None,
            )
        )
    steps = results.get("steps")
    if steps:
        sent = {name: counted["sent_per_task"] for name, counted in steps["commands"].items()}
        out.append(
            Row(
                "guarded body with one idemtask.step / plain guarded body (µs p50 "
                f"{steps['one step']['p50_us']:.0f} / {steps['plain body']['p50_us']:.0f}; "
                f"store commands per task {sent['one step']:.0f} / {sent['plain body']:.0f})",
                f"{steps['one_step_ratio']:.2f}",
                "",
                None,
            )
        )
    commands = results.get("commands")
    if commands:
        limits = {
            "unique task": 3,
            "duplicate enqueue": 1,
            "cached replay": 1,
            "deferred duplicate": 1,
        }
        for path, counted in commands.items():
            if not isinstance(counted, dict):
                continue
            limit = limits.get(path)
            sent = counted["sent_per_task"]
            detail = ", ".join(f"{k.upper()} {v}" for k, v in sorted(counted["sent"].items()))
            out.append(
                Row(
                    f"store commands sent per task: {path} ({detail}; "
                    f"{counted['in_scripts_per_task']:.0f} inside scripts)",
                    f"{sent:.2f}",
                    f"≤ {limit}" if limit is not None else "",
                    sent <= limit if limit is not None else None,
                )
            )
    memory = results.get("memory")
    if memory:
        beyond = memory["memory_usage_beyond_result"]
        out.append(
            Row(
                f"store memory per record beyond the {memory['result_bytes']}-byte result "
                f"(MEMORY USAGE {memory['memory_usage_one_record']} B)",
                f"{beyond} B",
                "≤ 250 B",
                beyond <= 250,
            )
        )
        out.append(
            Row(
                f"used_memory per completed record, {memory['records']:,} records "
                "(beyond the result)",
                f"{memory['used_memory_per_record']:.0f} B "
                f"({memory['used_memory_per_record_beyond_result']:.0f} B)",
                "",
                None,
            )
        )
    return out


def render(results: dict[str, Any]) -> str:
    """The Markdown table, then the machine it ran on."""
    lines = ["| measure | figure | target | met |", "|---|---:|---|---|"]
    for row in rows(results):
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.measure} | {row.figure} | {row.target} | {met} |")
    m = results.get("machine", {})
    start = " ".join(f"{x:.2f}" for x in m.get("load_at_start", ()))
    end = " ".join(f"{x:.2f}" for x in m.get("load_at_end", ()))
    lines += [
        "",
        f"Machine: {m.get('nproc')} CPUs, {m.get('cpu')}; Python {m.get('python')}, "
        f"redis-server {m.get('redis_server')}, redis-py {m.get('redis_py')}, "
        f"Celery {m.get('celery')}, Dramatiq {m.get('dramatiq')}, celery-once "
        f"{m.get('celery_once')}, celery-singleton {m.get('celery_singleton')}.",
        f"Load average (1/5/15 min) at start {start}, at end {end}; "
        f"run {m.get('started')} to {m.get('finished')}.",
    ]
    return "\n".join(lines)
