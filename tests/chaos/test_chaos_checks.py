"""The checks the chaos scenarios rely on, each shown to catch its violation on a made-up
ledger and to accept what a frozen holder legitimately leaves behind."""

from __future__ import annotations

import pytest

from idemtask.testing import (
    Entry,
    analyse,
    assert_all_completed,
    assert_no_run_after_completion,
    assert_no_stale_completion,
)


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
