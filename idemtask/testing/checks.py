"""The guarantees, checked against an effect ledger.

Each ``assert_*`` raises AssertionError listing every violation; :func:`analyse` returns the
figures (for reports) without asserting.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from idemtask.testing.ledger import Entry


@dataclass(slots=True)
class _Attempt:
    key: str
    token: int
    pid: int
    start: float
    end: float | None = None  # None: never returned (killed)
    effects: int = 0


@dataclass
class Report:
    """What a run did, from the ledger alone."""

    keys: int = 0
    body_starts: int = 0
    completed: int = 0
    replayed: int = 0
    deferred: int = 0
    takeovers: int = 0
    stale_rejected: int = 0
    lost: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    runs_after_completion: list[str] = field(default_factory=list)
    double_completions: list[str] = field(default_factory=list)
    repeated_effects: list[str] = field(default_factory=list)
    unexplained_repeats: list[str] = field(default_factory=list)
    stale_fenced_writes_accepted: list[str] = field(default_factory=list)
    fenced_rejected: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "keys": self.keys,
            "body starts": self.body_starts,
            "completed": self.completed,
            "replayed": self.replayed,
            "deferred": self.deferred,
            "takeovers": self.takeovers,
            "stale completions rejected": self.stale_rejected,
            "lost": len(self.lost),
            "overlaps": len(self.overlaps),
            "runs after completion": len(self.runs_after_completion),
            "double completions": len(self.double_completions),
            "repeated effects": len(self.repeated_effects),
            "repeated effects not explained by a crash": len(self.unexplained_repeats),
            "stale fenced writes accepted": len(self.stale_fenced_writes_accepted),
            "fenced writes rejected": self.fenced_rejected,
        }


def _attempts(entries: Sequence[Entry]) -> dict[str, list[_Attempt]]:
    """Body runs per key, each closed by its end entry or by the kill of its process."""
    killed_at = {e.pid: e.at for e in entries if e.kind == "killed"}
    open_runs: dict[tuple[str, int, int], _Attempt] = {}
    runs: dict[str, list[_Attempt]] = defaultdict(list)
    for entry in sorted(entries, key=lambda e: e.at):
        ident = (entry.key, entry.token, entry.pid)
        if entry.kind == "start":
            run = _Attempt(entry.key, entry.token, entry.pid, entry.at)
            open_runs[ident] = run
            runs[entry.key].append(run)
        elif entry.kind == "end" and ident in open_runs:
            open_runs.pop(ident).end = entry.at
        elif entry.kind in ("effect", "fenced_effect") and ident in open_runs:
            open_runs[ident].effects += 1
    for run in open_runs.values():
        run.end = killed_at.get(run.pid)
    return runs


def analyse(entries: Sequence[Entry], keys: Iterable[str] = ()) -> Report:
    report = Report()
    by_kind: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_kind[entry.kind].append(entry)
    completions: dict[str, list[Entry]] = defaultdict(list)
    for entry in by_kind["completed"]:
        completions[entry.key].append(entry)
    stale_tokens = {(e.key, e.token) for e in by_kind["stale_completion"]}
    stale_tokens |= {(e.key, e.token) for e in by_kind["lease_lost"]}
    runs = _attempts(entries)
    expected = set(keys) or set(runs) | set(completions)

    report.keys = len(expected)
    report.body_starts = len(by_kind["start"])
    report.completed = sum(len(v) for v in completions.values())
    report.replayed = len(by_kind["replayed"])
    report.deferred = len(by_kind["deferred"])
    report.takeovers = len(by_kind["takeover"])
    report.stale_rejected = len(by_kind["stale_completion"])
    report.lost = sorted(k for k in expected if k not in completions)
    report.double_completions = sorted(k for k, v in completions.items() if len(v) > 1)

    for key, key_runs in runs.items():
        ordered = sorted(key_runs, key=lambda r: r.start)
        for earlier, later in itertools.pairwise(ordered):
            # A run with no end was neither seen to return nor killed by the harness: we
            # cannot tell when it stopped, so it counts as still running.
            overlapping = earlier.end is None or earlier.end > later.start
            if overlapping and (key, earlier.token) not in stale_tokens:
                report.overlaps.append(
                    f"{key}: token {earlier.token} ran until {earlier.end} while token "
                    f"{later.token} started at {later.start}"
                )
        if key in completions:
            done_at = min(e.at for e in completions[key])
            for run in key_runs:
                if run.start > done_at:
                    report.runs_after_completion.append(
                        f"{key}: token {run.token} started {run.start - done_at:.3f}s after "
                        "the completion"
                    )
        effects = [r for r in key_runs if r.effects]
        if len(effects) > 1:
            report.repeated_effects.append(key)
            # A repeat is explained when every effect but the last came from a run that never
            # recorded its completion: it crashed (or lost its lease) after the effect.
            completed_tokens = {e.token for e in completions.get(key, [])}
            earlier_effects = sorted(effects, key=lambda r: r.start)[:-1]
            if any(r.token in completed_tokens for r in earlier_effects):
                report.unexplained_repeats.append(key)

    highest: dict[str, int] = {}
    for entry in sorted(by_kind["fenced_effect"], key=lambda e: e.at):
        if not entry.ok:
            report.fenced_rejected += 1
            continue
        if entry.token <= highest.get(entry.key, 0):
            report.stale_fenced_writes_accepted.append(f"{entry.key}: token {entry.token}")
        highest[entry.key] = max(entry.token, highest.get(entry.key, 0))
    return report


def _fail(what: str, problems: list[str]) -> None:
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AssertionError(f"{len(problems)} {what}:\n  {shown}{more}")


def assert_all_completed(entries: Sequence[Entry], keys: Iterable[str]) -> None:
    """Nothing lost: every key recorded exactly one accepted completion."""
    report = analyse(entries, keys)
    _fail("keys never completed", report.lost)
    _fail("keys completed twice", report.double_completions)


def assert_no_overlap(entries: Sequence[Entry]) -> None:
    """No two runs of a key overlapped, unless the earlier had lost its lease (and then its
    completion was rejected)."""
    _fail("overlapping runs", analyse(entries).overlaps)


def assert_no_run_after_completion(entries: Sequence[Entry]) -> None:
    """No body started after a completion of its key was recorded."""
    _fail("runs after completion", analyse(entries).runs_after_completion)


def assert_single_effect(entries: Sequence[Entry], *, fenced: bool = False) -> None:
    """One side effect per key, except where a crash fell between an effect and the
    completion; with ``fenced``, no stale write was ever accepted downstream."""
    report = analyse(entries)
    _fail("keys with repeats not explained by a crash", report.unexplained_repeats)
    if fenced:
        _fail("stale fenced writes accepted", report.stale_fenced_writes_accepted)
