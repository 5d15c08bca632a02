"""The guarantees, checked against an effect ledger.

Each ``assert_*`` raises AssertionError listing every violation; ``analyse`` returns the
figures (for reports) without asserting.
"""

from __future__ import annotations

import dataclasses
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
    effect_done: bool = False  # the body said its effects were done
    killed: bool = False  # ended by the kill of its process, not by returning


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
    #: Bodies of a frozen holder that began after the key's completion: their acquire came
    #: before it (a lower token), they lost their lease, and their completion was rejected.
    resumed_after_completion: int = 0
    #: Keys whose ``completed`` entry is missing but which were replayed: the completing
    #: process died between the store write and the ledger write.
    completions_seen_by_replay: int = 0
    stale_accepted: list[str] = field(default_factory=list)
    double_completions: list[str] = field(default_factory=list)
    repeated_effects: list[str] = field(default_factory=list)
    #: Of those, keys where an earlier run with the effect was killed before it returned
    #: (the window steps and ``idemtask.sql`` close) ...
    repeats_after_kill: list[str] = field(default_factory=list)
    #: ... and keys where a run with the effect had lost its lease: a frozen holder woke
    #: after a takeover (the window the fencing token closes).
    repeats_by_stale_holder: list[str] = field(default_factory=list)
    #: ... and keys where an earlier run with the effect returned, but no completion of its
    #: token was recorded (the store refused or could not be reached, or the body raised).
    repeats_after_unrecorded_end: list[str] = field(default_factory=list)
    unexplained_repeats: list[str] = field(default_factory=list)
    stale_fenced_writes_accepted: list[str] = field(default_factory=list)
    fenced_rejected: int = 0
    leases_lost: int = 0
    renewals: int = 0  # lease renewal round trips
    store_unavailable: int = 0
    #: A key's attempt got a fencing token not above one already handed out for that key.
    token_regressions: list[str] = field(default_factory=list)
    #: Acquisitions recorded late because their process was frozen (SIGSTOP) between the
    #: store's reply and the ledger write: their token looks lower, but was handed out earlier.
    tokens_recorded_after_a_stop: int = 0
    deliveries_acked: int = 0
    #: Keys that were delivered again after their record ended (``result_ttl`` after the
    #: completion) and are checked as new keys from there on.
    records_ended: int = 0
    #: Deliveries acked although they neither ran the body, nor replayed the stored result,
    #: nor published a copy of the message (a deferral or a retry): their message is gone.
    acked_without_run: list[str] = field(default_factory=list)
    #: Deliveries acked after a body run whose completion never reached the store (nor was
    #: rejected as stale): the work was done, but the record does not say so, and another
    #: copy of the key runs it again. Not lost; the price of an unrecorded completion.
    acked_unrecorded: int = 0
    #: Bodies killed after their ``effect_done`` and before they returned: the window
    #: between a side effect and the completion.
    killed_after_effect: int = 0

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
            "completions seen only through replays": self.completions_seen_by_replay,
            "overlaps": len(self.overlaps),
            "runs after completion": len(self.runs_after_completion),
            "frozen bodies resumed after completion": self.resumed_after_completion,
            "stale completions accepted": len(self.stale_accepted),
            "double completions": len(self.double_completions),
            "repeated effects": len(self.repeated_effects),
            "repeated effects not explained by a crash": len(self.unexplained_repeats),
            "repeated effects after a kill": len(self.repeats_after_kill),
            "repeated effects by a holder whose lease was lost": len(self.repeats_by_stale_holder),
            "repeated effects after a run that ended unrecorded": len(
                self.repeats_after_unrecorded_end
            ),
            "stale fenced writes accepted": len(self.stale_fenced_writes_accepted),
            "fenced writes rejected": self.fenced_rejected,
            "lease renewals": self.renewals,
            "leases lost": self.leases_lost,
            "store unavailable decisions": self.store_unavailable,
            "token regressions": len(self.token_regressions),
            "tokens recorded after a stop": self.tokens_recorded_after_a_stop,
            "deliveries acked": self.deliveries_acked,
            "records ended, then run again": self.records_ended,
            "deliveries acked without a run or a replay": len(self.acked_without_run),
            "deliveries acked with their completion unrecorded": self.acked_unrecorded,
            "bodies killed between effect and completion": self.killed_after_effect,
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
        elif entry.kind == "effect_done" and ident in open_runs:
            open_runs[ident].effect_done = True
    for run in open_runs.values():
        run.end = killed_at.get(run.pid)
        run.killed = run.end is not None
    return runs


def analyse(
    entries: Sequence[Entry], keys: Iterable[str] = (), *, result_ttl: float | None = None
) -> Report:
    """Every figure and violation of the ledger; ``keys`` are the keys that must complete
    (by default, every key the ledger mentions).

    With ``result_ttl`` (seconds), a key's record ends that long after its completion, as
    documented: what happens to the key afterwards is checked as a new key (see
    ``split_records``), so a run after the record ended, its token starting at 1 again and
    its second completion are not violations.
    """
    report = Report()
    if result_ttl is not None:
        entries, report.records_ended = split_records(entries, result_ttl)
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
    report.killed_after_effect = sum(
        1 for key_runs in runs.values() for run in key_runs if run.killed and run.effect_done
    )
    report.completed = sum(len(v) for v in completions.values())
    report.replayed = len(by_kind["replayed"])
    report.deferred = len(by_kind["deferred"])
    report.takeovers = len(by_kind["takeover"])
    report.stale_rejected = len(by_kind["stale_completion"])
    # A replay is proof that the store recorded a completion: the completing process may have
    # been killed after its store write and before its own ``completed`` entry reached the
    # ledger (the guard emits the decision after the write).
    replays: dict[str, list[Entry]] = defaultdict(list)
    for entry in by_kind["replayed"]:
        replays[entry.key].append(entry)
    report.lost = sorted(k for k in expected if k not in completions and k not in replays)
    report.completions_seen_by_replay = sum(
        1 for k in expected if k not in completions and k in replays
    )
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
        done_at, done_token = _completed_by(completions.get(key, []), replays.get(key, []))
        for run in key_runs:
            if run.start <= done_at:
                continue
            # Tokens only grow, so a lower token was acquired before the completing
            # attempt's: that holder froze between its acquire and its body's first entry.
            # It is no new run as long as it lost its lease (and its completion was
            # rejected); anything else started after the completion is a violation.
            if run.token < done_token and (key, run.token) in stale_tokens:
                report.resumed_after_completion += 1
                continue
            report.runs_after_completion.append(
                f"{key}: token {run.token} started {run.start - done_at:.3f}s after the completion"
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
            if any(r.killed for r in earlier_effects):
                report.repeats_after_kill.append(key)
            if any((key, r.token) in stale_tokens for r in effects):
                report.repeats_by_stale_holder.append(key)
            if any(
                not r.killed
                and r.token not in completed_tokens
                and (key, r.token) not in stale_tokens
                for r in earlier_effects
            ):
                report.repeats_after_unrecorded_end.append(key)

    # A completion is stale when a higher token had already been handed out for its key: the
    # store must have rejected it.
    acquired_tokens: dict[str, list[Entry]] = defaultdict(list)
    for entry in by_kind["acquired"] + by_kind["takeover"] + by_kind["start"]:
        acquired_tokens[entry.key].append(entry)
    for key, done in completions.items():
        for completion in done:
            newer = [
                e.token
                for e in acquired_tokens.get(key, [])
                if e.token > completion.token and e.at < completion.at
            ]
            if newer:
                report.stale_accepted.append(
                    f"{key}: token {completion.token} completed after token {max(newer)} "
                    "had acquired the key"
                )

    highest: dict[str, int] = {}
    for entry in sorted(by_kind["fenced_effect"], key=lambda e: e.at):
        if not entry.ok:
            report.fenced_rejected += 1
            continue
        if entry.token <= highest.get(entry.key, 0):
            report.stale_fenced_writes_accepted.append(f"{entry.key}: token {entry.token}")
        highest[entry.key] = max(entry.token, highest.get(entry.key, 0))
    report.leases_lost = len(by_kind["lease_lost"])
    report.renewals = len(by_kind["renewed"])
    report.store_unavailable = len(by_kind["store_unavailable"])
    _check_tokens(report, by_kind)
    _check_acks(report, entries)
    return report


#: What a delivery may have done for its ack to lose nothing.
_SETTLING = frozenset({"start", "replayed", "republished"})
#: What says a body run's outcome reached the store (or that another attempt's did).
_RECORDED = frozenset({"completed", "stale_completion", "released", "replayed", "republished"})
#: How a worker removes a message from its queue: an ack, or a nack (to a dead-letter queue).
_REMOVED = frozenset({"acked", "nacked"})


def _check_acks(report: Report, entries: Sequence[Entry]) -> None:
    """Every acked delivery ran the body, replayed the stored result or published a copy of
    its message (a deferral, a retry): otherwise the ack dropped the message unprocessed."""
    deliveries: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        if entry.delivery:
            deliveries[entry.delivery].append(entry)
    for delivery, own in sorted(deliveries.items()):
        kinds = {e.kind for e in own}
        if not kinds & _REMOVED:
            continue
        report.deliveries_acked += 1
        if kinds & _SETTLING:
            if "start" in kinds and not kinds & _RECORDED:
                report.acked_unrecorded += 1
            continue
        first = min(own, key=lambda e: e.at)
        did = ", ".join(sorted(kinds - {"delivered"} - _REMOVED)) or "nothing"
        report.acked_without_run.append(
            f"{first.key or first.attempt}: delivery {delivery} of message {first.task_id} "
            f"(pid {first.pid}) {'/'.join(sorted(kinds & _REMOVED))} after {did}"
        )


def _check_tokens(report: Report, by_kind: dict[str, list[Entry]]) -> None:
    """Tokens of one key strictly increase from one acquisition to the next.

    An acquisition is an ``acquired`` or ``takeover`` entry, or a body ``start`` whose token
    no such entry carries (its process died before the decision reached the ledger).
    """
    acquisitions: dict[str, list[Entry]] = defaultdict(list)
    for entry in by_kind["acquired"] + by_kind["takeover"]:
        acquisitions[entry.key].append(entry)
    decided = {(e.key, e.token) for e in by_kind["acquired"] + by_kind["takeover"]}
    for entry in by_kind["start"]:
        if (entry.key, entry.token) not in decided:
            decided.add((entry.key, entry.token))
            acquisitions[entry.key].append(entry)
    stops = _stop_windows(by_kind)
    for key, own in acquisitions.items():
        top: Entry | None = None
        for entry in sorted(own, key=lambda e: e.at):
            if entry.token <= 0:  # an unguarded run (on_store_error="run") has no token
                continue
            if top is not None and entry.token <= top.token:
                if _frozen_between(stops.get(entry.pid, []), top.at, entry.at):
                    report.tokens_recorded_after_a_stop += 1
                    continue
                report.token_regressions.append(
                    f"{key}: token {entry.token} (pid {entry.pid}) acquired "
                    f"{entry.at - top.at:.3f}s after token {top.token} (pid {top.pid})"
                )
            if top is None or entry.token > top.token:
                top = entry


def _stop_windows(by_kind: dict[str, list[Entry]]) -> dict[int, list[tuple[float, float]]]:
    """When each process was frozen: (stopped at, continued at) pairs."""
    windows: dict[int, list[tuple[float, float]]] = defaultdict(list)
    continued = sorted(by_kind["continued"], key=lambda e: e.at)
    for stop in by_kind["stopped"]:
        after = [c.at for c in continued if c.pid == stop.pid and c.at >= stop.at]
        windows[stop.pid].append((stop.at, after[0] if after else float("inf")))
    return windows


def _frozen_between(windows: list[tuple[float, float]], before: float, seen: float) -> bool:
    """A stop began before ``before`` and ended before ``seen``: an entry seen after it may
    describe something that happened before the stop."""
    return any(stopped < before and resumed <= seen for stopped, resumed in windows)


#: How much earlier than its ledger entry a completion may have reached the store.
TTL_SLACK = 0.25


def split_records(entries: Sequence[Entry], result_ttl: float) -> tuple[list[Entry], int]:
    """Entries of a key recorded more than ``result_ttl`` after its completion belong to a
    new record of that key, renamed ``key@1``, ``key@2``...; also returns how many new
    records there were. Only the first completion (or replay) of each record counts."""
    done_at: dict[str, float] = {}
    generation: dict[str, int] = defaultdict(int)
    out = []
    for entry in sorted(entries, key=lambda e: e.at):
        key = entry.key
        if key and key in done_at and entry.at > done_at[key] + result_ttl - TTL_SLACK:
            del done_at[key]
            generation[key] += 1
        if key and entry.kind in ("completed", "replayed"):
            done_at.setdefault(key, entry.at)
        if key and generation[key]:
            entry = dataclasses.replace(entry, key=f"{key}@{generation[key]}")
        out.append(entry)
    return out, sum(generation.values())


def _completed_by(completions: list[Entry], replays: list[Entry]) -> tuple[float, float]:
    """When a key's completion was recorded at the latest, and by which token: the first
    ``completed`` entry, else the first replay (the completion came before it, by a token
    we do not know, so any stale token counts as lower)."""
    if completions:
        first = min(completions, key=lambda e: e.at)
        return first.at, float(first.token)
    if replays:
        return min(e.at for e in replays), float("inf")
    return float("inf"), 0.0


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


def assert_no_stale_completion(entries: Sequence[Entry]) -> None:
    """No completion was accepted from an attempt after a newer attempt (a higher fencing
    token) had taken its key over: a stale holder never records its value."""
    _fail("stale completions accepted", analyse(entries).stale_accepted)


def assert_no_overlap(entries: Sequence[Entry]) -> None:
    """No two runs of a key overlapped, unless the earlier had lost its lease (and then its
    completion was rejected)."""
    _fail("overlapping runs", analyse(entries).overlaps)


def assert_no_run_after_completion(entries: Sequence[Entry]) -> None:
    """No body started after a completion of its key was recorded."""
    _fail("runs after completion", analyse(entries).runs_after_completion)


def assert_tokens_increase(entries: Sequence[Entry]) -> None:
    """Fencing tokens of one key strictly increase across its attempts: a downstream system
    that keeps the highest token per key can always refuse the stale holder."""
    _fail("fencing token regressions", analyse(entries).token_regressions)


def assert_no_ack_without_run(entries: Sequence[Entry]) -> None:
    """No delivery was acked without running the body, replaying the stored result or
    publishing a copy of its message (needs ``begin_delivery``/``settled`` entries)."""
    _fail("deliveries acked without a run or a replay", analyse(entries).acked_without_run)


def assert_single_effect(entries: Sequence[Entry], *, fenced: bool = False) -> None:
    """One side effect per key, except where a crash fell between an effect and the
    completion; with ``fenced``, no stale write was ever accepted downstream."""
    report = analyse(entries)
    _fail("keys with repeats not explained by a crash", report.unexplained_repeats)
    if fenced:
        _fail("stale fenced writes accepted", report.stale_fenced_writes_accepted)
