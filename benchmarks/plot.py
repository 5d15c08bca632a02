"""The figure of the docs: worker throughput relative to plain, against body duration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import e2e_figures as fig
from benchmarks.report import CELERY, DRAMATIQ, EndToEnd


def _lines(spec: EndToEnd, runs: list[dict[str, Any]]) -> list[tuple[str, list[fig.Spread]]]:
    return [
        (
            f"{spec.label} {variant}",
            [fig.throughput_ratio(runs, variant, spec.plain, b) for b in fig.bodies(runs)],
        )
        for variant in (spec.guarded, *spec.peers)
    ]


def plot_throughput(results: dict[str, Any], path: Path) -> bool:
    """Draw the per-round median ratio (bars: the rounds' range) for each framework's guarded
    variant and the peers; False (nothing written) when no end-to-end section ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for section, spec in (("celery", CELERY), ("dramatiq", DRAMATIQ)):
        figures = results.get(section)
        if figures:
            runs = figures["throughput"]
            series += [(label, fig.bodies(runs), spreads) for label, spreads in _lines(spec, runs)]
    if not series:
        return False
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    for offset, (label, bodies, spreads) in enumerate(series):
        # Body durations as evenly spaced categories (0 has no place on a log axis); each
        # series nudged sideways so the bars do not hide one another.
        xs = [index + (offset - (len(series) - 1) / 2) * 0.06 for index in range(len(bodies))]
        medians = [s.median for s in spreads]
        errors = [[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]]
        axes.errorbar(xs, medians, yerr=errors, marker="o", capsize=3, label=label)
    labels = fig.bodies(results.get("celery", results.get("dramatiq", {})).get("throughput", []))
    axes.set_xticks(range(len(labels)), [f"{b:g} ms" for b in labels])
    axes.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel("task body duration")
    axes.set_ylabel("worker throughput / plain (same round)")
    rounds = max(s.count for _, _, spreads in series for s in spreads)
    load = results.get("machine", {}).get("load_at_start", ())
    axes.set_title(
        f"Throughput relative to plain, median of {rounds} rounds"
        + (f" (load {load[0]:.2f} at start)" if load else ""),
        fontsize=10,
    )
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True
