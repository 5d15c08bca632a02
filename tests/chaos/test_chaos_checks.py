"""The checks the chaos scenarios rely on, each shown to catch its violation on a made-up
ledger and to accept what a frozen holder legitimately leaves behind."""

from __future__ import annotations

from collections import Counter

import pytest

from idemtask.testing import (
    Entry,
    analyse,
    assert_all_completed,
    assert_no_ack_without_run,
    assert_no_run_after_completion,
    assert_no_stale_completion,
    assert_tokens_increase,
)
from idemtask.testing.chaos import Result
from idemtask.testing.checks import Report


def e(kind: str, key: str, token: int, at: float, pid: int = 1) -> Entry:
    return Entry(kind, key, f"a{token}", token, at, pid, "t")


# Token 1 acquires, then freezes before its body's first entry; token 2 takes the key over
# and completes; token 1 wakes up, runs its body and is told its completion is stale.
FROZEN_BEFORE_BODY = [
    e("acquired", "k", 1, 0.0),
    e("takeover", "k", 2, 3.0, pid=2), e("start", "k", 2, 3.1, pid=2),
    e("end", "k", 2, 3.2, pid=2), e("completed", "k", 2, 3.3, pid=2),
    e("start", "k", 1, 5.0), e("end", "k", 1, 5.1), e("lease_lost", "k", 1, 5.1),
    e("stale_completion", "k", 1, 5.2),
]  # fmt: skip


def test_a_frozen_holder_resuming_after_the_completion_is_no_new_run() -> None:
    assert_no_run_after_completion(FROZEN_BEFORE_BODY)
    assert_no_stale_completion(FROZEN_BEFORE_BODY)
    assert analyse(FROZEN_BEFORE_BODY).resumed_after_completion == 1


def test_a_lower_token_starting_after_completion_without_losing_its_lease_is_caught() -> None:
    # The same history, but nothing says token 1 lost its lease: a store that forgot the
    # key (an unpersisted restart) hands out token 1 again after token 2 completed.
    forgot = [x for x in FROZEN_BEFORE_BODY if x.kind not in ("lease_lost", "stale_completion")]
    with pytest.raises(AssertionError, match="1 runs after completion"):
        assert_no_run_after_completion(forgot)


def test_a_new_token_after_the_completion_is_caught_even_if_it_later_went_stale() -> None:
    late = [e("start", "k", 1, 0.0), e("end", "k", 1, 0.1), e("completed", "k", 1, 0.2),
            e("start", "k", 2, 0.3, pid=2), e("stale_completion", "k", 2, 0.4, pid=2)]  # fmt: skip
    with pytest.raises(AssertionError, match="1 runs after completion"):
        assert_no_run_after_completion(late)


def test_an_accepted_stale_completion_is_caught() -> None:
    # Token 2 took the key over at 3.0, yet token 1's completion at 4.0 was accepted.
    accepted = [e("acquired", "k", 1, 0.0), e("start", "k", 1, 0.1),
                e("takeover", "k", 2, 3.0, pid=2), e("end", "k", 1, 3.9),
                e("completed", "k", 1, 4.0)]  # fmt: skip
    with pytest.raises(AssertionError, match="1 stale completions accepted"):
        assert_no_stale_completion(accepted)
    assert analyse(accepted).as_dict()["stale completions accepted"] == 1
    # The right outcome of the same race: token 1's completion rejected, token 2's accepted.
    rejected = [*accepted[:-1], e("stale_completion", "k", 1, 4.0),
                e("completed", "k", 2, 4.5, pid=2)]  # fmt: skip
    assert_no_stale_completion(rejected)


def test_a_replay_proves_a_completion_whose_entry_died_with_its_process() -> None:
    # The completing process was killed after the store write, before its ``completed``
    # entry; the redelivered copy was replayed, so the key is not lost.
    killed = [e("start", "k", 1, 0.0), e("end", "k", 1, 0.1), e("killed", "", 0, 0.11),
              e("replayed", "k", 0, 2.0, pid=2)]  # fmt: skip
    assert_all_completed(killed, ["k"])
    report = analyse(killed, ["k"])
    assert (report.lost, report.completions_seen_by_replay) == ([], 1)
    # A body started after that replay is still a run after completion.
    with pytest.raises(AssertionError, match="1 runs after completion"):
        assert_no_run_after_completion([*killed, e("start", "k", 2, 2.5, pid=3)])
    # Without the replay the key is lost.
    with pytest.raises(AssertionError, match="1 keys never completed"):
        assert_all_completed(killed[:-1], ["k"])


def d(kind: str, delivery: str, at: float, key: str = "k", token: int = 0) -> Entry:
    """An entry recorded inside delivery ``delivery`` of message ``m``."""
    return Entry(kind, key, f"a{token}", token, at, 1, "m", delivery=delivery)


def test_token_regressions_are_caught_and_increasing_tokens_pass() -> None:
    increasing = [e("acquired", "k", 1, 0.0), e("takeover", "k", 2, 3.0, pid=2),
                  e("acquired", "j", 1, 3.5), e("takeover", "k", 3, 6.0)]  # fmt: skip
    assert_tokens_increase(increasing)
    # The record expired while its holder ran: the next acquire starts from token 1 again.
    expired = [e("acquired", "k", 1, 0.0), e("acquired", "k", 1, 5.0, pid=2)]
    with pytest.raises(AssertionError, match="1 fencing token regressions"):
        assert_tokens_increase(expired)
    # A lower token after a higher one is a regression too, also when only the body's start
    # shows it (the process died before its ``acquired`` entry reached the ledger).
    lower = [e("takeover", "k", 3, 0.0), e("start", "k", 2, 4.0, pid=2)]
    with pytest.raises(AssertionError, match="1 fencing token regressions"):
        assert_tokens_increase(lower)
    assert analyse(lower).as_dict()["token regressions"] == 1


def test_a_token_recorded_late_by_a_frozen_process_is_no_regression() -> None:
    # pid 1 acquired token 1 and froze before writing its entry; token 2 took over meanwhile.
    frozen = [e("stopped", "", 0, 0.5), e("takeover", "k", 2, 4.0, pid=2),
              e("continued", "", 0, 9.0), e("acquired", "k", 1, 9.01)]  # fmt: skip
    assert_tokens_increase(frozen)
    assert analyse(frozen).tokens_recorded_after_a_stop == 1
    # The same late token from a process that was never frozen is a regression.
    with pytest.raises(AssertionError, match="1 fencing token regressions"):
        assert_tokens_increase([x for x in frozen if x.kind not in ("stopped", "continued")])


def test_an_ack_after_a_run_a_replay_or_a_republish_is_fine() -> None:
    fine = [
        d("delivered", "d1", 0.0), d("acquired", "d1", 0.1, token=1), d("start", "d1", 0.2),
        d("end", "d1", 0.3), d("completed", "d1", 0.4), d("acked", "d1", 0.5),
        d("delivered", "d2", 1.0), d("replayed", "d2", 1.1), d("acked", "d2", 1.2),
        d("delivered", "d3", 2.0), d("deferred", "d3", 2.1), d("republished", "d3", 2.2),
        d("acked", "d3", 2.3),
        # Requeued, not acked: the broker keeps the message.
        d("delivered", "d4", 3.0), d("store_unavailable", "d4", 3.1), d("requeued", "d4", 3.2),
    ]  # fmt: skip
    assert_no_ack_without_run(fine)
    assert analyse(fine).deliveries_acked == 3
    # A body that ran but whose completion never reached the store is no loss (the work was
    # done), but it is counted: another copy will run the key again.
    unrecorded = [d("delivered", "d5", 4.0), d("start", "d5", 4.1), d("end", "d5", 4.2),
                  d("store_unavailable", "d5", 4.3), d("acked", "d5", 4.4)]  # fmt: skip
    assert_no_ack_without_run(unrecorded)
    assert (analyse(fine).acked_unrecorded, analyse(unrecorded).acked_unrecorded) == (0, 1)


def test_an_ack_without_a_run_or_a_replay_is_caught() -> None:
    # The store answered with an error the guard did not expect; the task failed and the
    # framework acked the message: this copy is gone without its body having run.
    dropped = [d("delivered", "d1", 0.0), d("store_unavailable", "d1", 0.1),
               d("acked", "d1", 0.2)]  # fmt: skip
    with pytest.raises(AssertionError, match="1 deliveries acked without a run or a replay"):
        assert_no_ack_without_run(dropped)
    report = analyse(dropped)
    assert report.acked_without_run == [
        "k: delivery d1 of message m (pid 1) acked after store_unavailable"
    ]
    # A deferral that never published its copy is caught as well.
    unpublished = [d("delivered", "d1", 0.0), d("deferred", "d1", 0.1), d("acked", "d1", 0.2)]
    with pytest.raises(AssertionError, match="1 deliveries acked"):
        assert_no_ack_without_run(unpublished)


def test_what_follows_the_end_of_a_record_is_checked_as_a_new_key() -> None:
    # Token 1 completed at 1.0; with a 5 s result_ttl the record ends at 6.0. A delivery at
    # 8.0 acquires a fresh record (token 1 again), runs and completes: documented, no violation.
    history = [e("acquired", "k", 1, 0.0), e("start", "k", 1, 0.1), e("end", "k", 1, 0.9),
               e("completed", "k", 1, 1.0), e("replayed", "k", 0, 3.0, pid=2),
               e("acquired", "k", 1, 8.0, pid=2), e("start", "k", 1, 8.1, pid=2),
               e("end", "k", 1, 8.2, pid=2), e("completed", "k", 1, 8.3, pid=2)]  # fmt: skip
    report = analyse(history, ["k"], result_ttl=5.0)
    assert report.records_ended == 1
    assert (report.runs_after_completion, report.token_regressions) == ([], [])
    assert (report.double_completions, report.lost) == ([], [])
    # Within the record's life the same history breaks three guarantees.
    within = analyse(history, ["k"], result_ttl=60.0)
    assert within.records_ended == 0
    assert len(within.runs_after_completion) == len(within.token_regressions) == 1
    assert within.double_completions == ["k"]


def test_repeated_effects_are_told_apart_by_what_left_the_first_one_unfinished() -> None:
    """A body killed after its effect (and its ``effect_done``) is counted as killed between
    effect and completion, and the repeat as one after a kill; a frozen holder that did the
    effect after the takeover is counted as a repeat by a holder whose lease was lost."""
    killed = [e("start", "k", 1, 0.0), e("effect", "k", 1, 0.1), e("effect_done", "k", 1, 0.1),
              e("killed", "", 0, 0.15), e("takeover", "k", 2, 3.0, pid=2),
              e("start", "k", 2, 3.1, pid=2), e("effect", "k", 2, 3.2, pid=2),
              e("end", "k", 2, 3.3, pid=2), e("completed", "k", 2, 3.4, pid=2)]  # fmt: skip
    report = analyse(killed).as_dict()
    assert report["bodies killed between effect and completion"] == 1
    assert report["repeated effects after a kill"] == 1
    assert report["repeated effects by a holder whose lease was lost"] == 0

    # The kill before ``effect_done``: inside the effect, not after it.
    inside = [x for x in killed if x.kind != "effect_done"]
    assert analyse(inside).as_dict()["bodies killed between effect and completion"] == 0

    frozen = [e("acquired", "k", 1, 0.0), e("start", "k", 1, 0.1),
              e("takeover", "k", 2, 3.0, pid=2), e("start", "k", 2, 3.1, pid=2),
              e("effect", "k", 2, 3.2, pid=2), e("end", "k", 2, 3.3, pid=2),
              e("completed", "k", 2, 3.4, pid=2), e("effect", "k", 1, 5.0),
              e("end", "k", 1, 5.1), e("stale_completion", "k", 1, 5.2)]  # fmt: skip
    report = analyse(frozen).as_dict()
    assert report["repeated effects"] == 1
    assert report["repeated effects after a kill"] == 0
    assert report["repeated effects by a holder whose lease was lost"] == 1
    assert report["bodies killed between effect and completion"] == 0


def test_a_repeat_after_a_run_whose_completion_was_not_recorded_is_told_apart() -> None:
    """Token 1 did the effect and returned, but its completion never reached the store (no
    ``completed`` entry); token 2 ran again."""
    unrecorded = [e("start", "k", 1, 0.0), e("effect", "k", 1, 0.1), e("end", "k", 1, 0.2),
                  e("store_unavailable", "k", 1, 0.3), e("start", "k", 2, 3.1, pid=2),
                  e("effect", "k", 2, 3.2, pid=2), e("end", "k", 2, 3.3, pid=2),
                  e("completed", "k", 2, 3.4, pid=2)]  # fmt: skip
    report = analyse(unrecorded).as_dict()
    assert report["repeated effects after a run that ended unrecorded"] == 1
    assert report["repeated effects after a kill"] == 0
    assert report["repeated effects not explained by a crash"] == 0


def test_sql_mode_counts_a_second_committed_row_and_a_missing_one_as_violations() -> None:
    result = Result(
        scenario="celery-redis", seed=1, keys=3, messages=9, seconds=1.0, faults=Counter(),
        skipped_faults=[], report=Report(), store_not_done=[], effects="sql",
        effect_rows={"a": 1, "b": 2}, database_missing=["c"],
    )  # fmt: skip
    assert result.violations == {
        "repeated database effects": ["b: 2 rows"],
        "keys without an effect row": ["c"],
    }
    figures = result.figures()
    assert (figures["effects"], figures["repeated effects"], figures["database effect rows"]) == (
        "sql", 1, 3,
    )  # fmt: skip
    assert "repeated effects after a kill" not in figures  # the ledger has no effect entries
