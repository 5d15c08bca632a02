"""Turn the raw figures into the table of figures and targets (Markdown)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from benchmarks import e2e_figures as fig
from benchmarks import variants
from benchmarks.store_calls import summary_lines


@dataclass(frozen=True)
class Row:
    measure: str
    figure: str
    target: str
    met: bool | None  # None: shown for context, no target
    #: the rounds strayed beyond ±NOISY_PERCENT of the median: the verdict is not firm
    noisy: bool = False


#: How far (in % of the median) the rounds of a firm figure stay from it.
NOISY_PERCENT = 10.0


def _noisy(spread: fig.Spread) -> bool:
    return not spread.percent <= NOISY_PERCENT  # nan (a single value, zero) counts as firm


def keys_rows(figures: Any) -> list[Row]:
    out: list[Row] = []
    for key in figures:
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
    return out


def enqueue_rows(enqueue: Any) -> list[Row]:
    out: list[Row] = []
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
            "duplicate apply_async speed-up over a real one, in isolation (p50, plain Task; "
            f"{versus_new:.1f}× over an IdempotentTask enqueue)",
            f"{speedup:.1f}×",
            "",
            None,
        )
    )
    return out


def execute_rows(execute: Any) -> list[Row]:
    out: list[Row] = []
    out.append(
        Row(
            "worker trace per task, plain / IdempotentTask (µs p50)",
            f"{execute['plain_trace']['p50_us']:.0f} / {execute['idempotent_trace']['p50_us']:.0f}",
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
    return out


def steps_rows(steps: Any) -> list[Row]:
    out: list[Row] = []
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
    return out


def commands_rows(commands: Any) -> list[Row]:
    out: list[Row] = []
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
    return out


def memory_rows(memory: Any) -> list[Row]:
    out: list[Row] = []
    usage = memory["memory_usage_one_record"]
    out.append(
        Row(
            f"**store memory per completed record** with a {memory['result_bytes']}-byte result "
            f"(MEMORY USAGE; {memory['memory_usage_beyond_result']} B beyond the result)",
            f"{usage} B",
            "≤ 240 B",
            usage <= 240,
        )
    )
    out.append(
        Row(
            f"used_memory per completed record, {memory['records']:,} records (beyond the result)",
            f"{memory['used_memory_per_record']:.0f} B "
            f"({memory['used_memory_per_record_beyond_result']:.0f} B)",
            "",
            None,
        )
    )
    return out


@dataclass(frozen=True)
class EndToEnd:
    """What the report compares in one framework's end-to-end runs, and the targets."""

    label: str
    plain: str
    guarded: str
    duplicates: str
    peers: tuple[str, ...]
    #: body duration (ms) -> least throughput of the guarded variant over plain
    min_ratio: Mapping[float, float]


CPU_PER_TASK_US = 300  # whole-system CPU a unique task may add
CPU_PER_DUPLICATE_US = 150  # whole-system CPU of a duplicate enqueue
DUPLICATE_SPEEDUP = 3.0  # a duplicate enqueue against a real (plain) one

CELERY = EndToEnd(
    "Celery",
    variants.CELERY_PLAIN.name,
    variants.CELERY_IDEMPOTENT.name,
    variants.CELERY_DUPLICATES.name,
    (variants.CELERY_ONCE.name, variants.CELERY_SINGLETON.name),
    {0.0: 0.90, 10.0: 0.95},
)
DRAMATIQ = EndToEnd(
    "Dramatiq",
    variants.DRAMATIQ_PLAIN.name,
    variants.DRAMATIQ_IDEMPOTENT.name,
    variants.DRAMATIQ_DUPLICATES.name,
    (),
    {0.0: 0.85, 10.0: 0.95},
)


def _ms(body: float) -> str:
    return f"{body:g} ms"


def e2e_rows(spec: EndToEnd, figures: Mapping[str, Any]) -> list[Row]:
    """Throughput ratios per body duration, whole-system CPU added, the duplicate path and
    latency, each a median over rounds with the rounds' spread."""
    runs = figures["throughput"]
    name, plain, guarded, dup = spec.label, spec.plain, spec.guarded, spec.duplicates
    out: list[Row] = []
    for body in fig.bodies(runs):
        names = (plain, guarded, *spec.peers)
        rates = " / ".join(f"{fig.tasks_per_second(runs, v, body):.0f}" for v in names)
        out.append(
            Row(
                f"{name} worker tasks/s, {_ms(body)} body: " + " / ".join(names),
                rates,
                "",
                None,
            )
        )
        ratio = fig.throughput_ratio(runs, guarded, plain, body)
        least = spec.min_ratio.get(body)
        out.append(
            Row(
                f"**{name} {guarded} / {plain} throughput, {_ms(body)} body**",
                ratio.text(),
                f"≥ {least:.2f}" if least is not None else "",
                ratio.median >= least if least is not None else None,
                _noisy(ratio),
            )
        )
        for peer in spec.peers:
            versus = fig.throughput_ratio(runs, guarded, peer, body)
            alone = fig.throughput_ratio(runs, peer, plain, body).median
            out.append(
                Row(
                    f"{name} {guarded} / {peer} throughput, {_ms(body)} body "
                    f"({peer} / {plain}: {alone:.2f})",
                    versus.text(),
                    "≥ 1.0",
                    versus.median >= 1.0,
                    _noisy(versus),
                )
            )
    added = fig.cpu_added(runs, guarded, plain)
    by_body = ", ".join(
        f"{_ms(b)} {fig.cpu_added(runs, guarded, plain, b).median:.0f}" for b in fig.bodies(runs)
    )
    parts = ", ".join(
        f"{part} {fig.cpu_added(runs, guarded, plain, part=part).median:.0f}"
        for part in ("publisher", "worker", "broker", "store")
    )
    out.append(
        Row(
            f"**{name} whole-system CPU added per unique task** (µs; by body {by_body}; "
            f"by process {parts})",
            added.text(0),
            f"≤ {CPU_PER_TASK_US} µs",
            added.median <= CPU_PER_TASK_US,
            _noisy(added),
        )
    )
    for peer in spec.peers:
        out.append(
            Row(
                f"{name} {peer}: whole-system CPU added per task (µs)",
                fig.cpu_added(runs, peer, plain).text(0),
                "",
                None,
            )
        )
    per_dup = fig.cpu_per_duplicate(runs, dup)
    out.append(
        Row(
            f"**{name} whole-system CPU per duplicate enqueue** (µs)",
            per_dup.text(0),
            f"≤ {CPU_PER_DUPLICATE_US} µs",
            per_dup.median <= CPU_PER_DUPLICATE_US,
            _noisy(per_dup),
        )
    )
    dup_cpu = fig.duplicate_publish_us(runs, dup, "duplicates_publisher_cpu_seconds")
    wall = " / ".join(f"{fig.publish_us(runs, v).median:.0f}" for v in (plain, guarded))
    wall += f" / {fig.duplicate_publish_us(runs, dup).median:.0f}"
    cpu = " / ".join(
        f"{fig.publish_us(runs, v, 'publisher_cpu_seconds').median:.0f}" for v in (plain, guarded)
    )
    cpu += f" / {dup_cpu.median:.0f}"
    out.append(
        Row(
            f"{name} publisher per call, plain / new key / duplicate (µs wall; CPU {cpu})",
            wall,
            "",
            None,
        )
    )
    speedup = fig.duplicate_speedup(runs, dup, plain)
    out.append(
        Row(
            f"**{name} duplicate enqueue speed-up over a real (plain) enqueue** (publisher wall)",
            speedup.text(1).replace(" (", "× (", 1),
            f"≥ {DUPLICATE_SPEEDUP:.0f}×",
            speedup.median >= DUPLICATE_SPEEDUP,
            _noisy(speedup),
        )
    )
    latency_runs = figures["latency"]
    base = fig.latency(latency_runs, plain)
    for variant in (guarded, *spec.peers):
        seen = fig.latency(latency_runs, variant)
        out.append(
            Row(
                f"{name} {variant}: latency added per task, enqueue to result, p50 / p99 (µs; "
                f"{plain} {base.p50_us:.0f} / {base.p99_us:.0f}; {seen.samples} calls)",
                f"{seen.p50_us - base.p50_us:+.0f} / {seen.p99_us - base.p99_us:+.0f}",
                "",
                None,
            )
        )
    e2e_commands = [r["store_commands_per_task"] for r in runs if r["variant"] == guarded]
    out.append(
        Row(
            f"{name} {guarded}: store commands sent per task, end to end",
            f"{fig.spread(e2e_commands).median:.2f}",
            "",
            None,
        )
    )
    return out


#: How each section's figures become rows; a new section adds one entry.
def busy_rows(busy: Any) -> list[Row]:
    """Completion-to-replay latency of duplicates delivered while their key runs."""
    hold_ms = round(busy["hold_seconds"] * 1000)
    out: list[Row] = []
    for record in busy["results"]:
        name, p50, p99 = record["variant"], record["p50_ms"], record["p99_ms"]
        out.append(
            Row(
                f"**busy duplicate answered after the holder's end** ({name}; holder "
                f"{hold_ms} ms, {record['copies']} copies, {record['deferrals_per_copy']} "
                f"deferrals per copy, at most {record['most_deferrals']}) p50 / p99 ms",
                f"{p50:.0f} / {p99:.0f}",
                "≤ 100 / ≤ 500",
                p50 <= 100 and p99 <= 500,
            )
        )
    return out


SECTION_ROWS: dict[str, Callable[[Any], list[Row]]] = {
    "celery": lambda figures: e2e_rows(CELERY, figures),
    "dramatiq": lambda figures: e2e_rows(DRAMATIQ, figures),
    "keys": keys_rows,
    "enqueue": enqueue_rows,
    "execute": execute_rows,
    "steps": steps_rows,
    "busy": busy_rows,
    "commands": commands_rows,
    "memory": memory_rows,
    "storecalls": lambda figures: [Row(m, f, "", None) for m, f in summary_lines(figures)],
}


def rows(results: Mapping[str, Any]) -> list[Row]:
    """Every section present in ``results``, in ``SECTION_ROWS`` order."""
    return [
        row
        for section, to_rows in SECTION_ROWS.items()
        if results.get(section)
        for row in to_rows(results[section])
    ]


def render(results: dict[str, Any]) -> str:
    """The Markdown table, then the machine it ran on."""
    lines = ["| measure | figure | target | met |", "|---|---:|---|---|"]
    for row in rows(results):
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        if row.noisy and row.met is not None:
            met += f" (rounds beyond ±{NOISY_PERCENT:.0f} %)"
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
