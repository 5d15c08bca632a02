"""The harness users get: the checks catch each violation, and pass a correct real run."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from idemtask.codecs import JsonCodec
from idemtask.guard import Call, Deferred, Guard
from idemtask.policy import Policy
from idemtask.store import RedisStore
from idemtask.testing import (
    EffectLedger,
    Entry,
    Faults,
    analyse,
    assert_all_completed,
    assert_no_overlap,
    assert_no_run_after_completion,
    assert_single_effect,
    children,
)


def e(kind: str, key: str, token: int, at: float, pid: int = 1, ok: bool = True) -> Entry:
    return Entry(kind, key, f"a{token}", token, at, pid, "t", ok)


def test_checks_pass_a_clean_history() -> None:
    entries = [
        e("acquired", "k", 1, 0.0), e("start", "k", 1, 0.1), e("effect", "k", 1, 0.2),
        e("end", "k", 1, 0.3), e("completed", "k", 1, 0.4), e("replayed", "k", 0, 0.5),
    ]  # fmt: skip
    assert_all_completed(entries, ["k"])
    assert_no_overlap(entries)
    assert_no_run_after_completion(entries)
    assert_single_effect(entries)
    assert analyse(entries, ["k"]).as_dict()["replayed"] == 1


def test_each_check_catches_its_violation() -> None:
    overlap = [e("start", "k", 1, 0.0), e("start", "k", 2, 0.1, pid=2), e("end", "k", 1, 0.2),
               e("end", "k", 2, 0.3, pid=2)]  # fmt: skip
    with pytest.raises(AssertionError, match="1 overlapping runs"):
        assert_no_overlap(overlap)
    # The same overlap is allowed when the earlier holder's completion was rejected as stale.
    assert_no_overlap([*overlap, e("stale_completion", "k", 1, 0.25)])

    late = [e("start", "k", 1, 0.0), e("end", "k", 1, 0.1), e("completed", "k", 1, 0.2),
            e("start", "k", 2, 0.3, pid=2), e("end", "k", 2, 0.4, pid=2)]  # fmt: skip
    with pytest.raises(AssertionError, match="1 runs after completion"):
        assert_no_run_after_completion(late)

    with pytest.raises(AssertionError, match="1 keys never completed"):
        assert_all_completed([e("start", "k", 1, 0.0)], ["k"])
    with pytest.raises(AssertionError, match="keys completed twice"):
        assert_all_completed([e("completed", "k", 1, 0.0), e("completed", "k", 2, 1.0)], ["k"])

    repeated = [e("start", "k", 1, 0.0), e("effect", "k", 1, 0.1), e("end", "k", 1, 0.2),
                e("completed", "k", 1, 0.3), e("start", "k", 2, 0.4, pid=2),
                e("effect", "k", 2, 0.5, pid=2)]  # fmt: skip
    with pytest.raises(AssertionError, match="repeats not explained by a crash"):
        assert_single_effect(repeated)
    crashed = [e("start", "k", 1, 0.0), e("effect", "k", 1, 0.1), e("killed", "", 0, 0.15),
               e("start", "k", 2, 0.4, pid=2), e("effect", "k", 2, 0.5, pid=2),
               e("end", "k", 2, 0.6, pid=2), e("completed", "k", 2, 0.7)]  # fmt: skip
    assert_single_effect(crashed)  # a crash between effect and completion explains it
    assert analyse(crashed).as_dict()["repeated effects"] == 1

    fenced = [e("fenced_effect", "k", 2, 0.1), e("fenced_effect", "k", 1, 0.2)]
    with pytest.raises(AssertionError, match="stale fenced writes accepted"):
        assert_single_effect(fenced, fenced=True)


def test_a_real_run_with_a_stopped_holder(
    idemtask_store: RedisStore, idemtask_ledger: EffectLedger
) -> None:
    """Two guards race for keys; one holder freezes past its lease and wakes up stale."""
    idemtask_ledger.observe()
    policy = Policy(lease=0.3, result_ttl=60)
    keys = [uuid.uuid4().hex for _ in range(5)]
    frozen = keys[0]
    frozen_holds = threading.Event()

    def body() -> str:
        with idemtask_ledger.body() as execution:
            if execution.key == frozen and execution.fencing_token == 1:
                guard_a.leases.drop(execution.attempt_id)  # frozen: no renewal
                frozen_holds.set()
                time.sleep(0.6)
            idemtask_ledger.fenced_effect()
            return execution.key

    guard_a, guard_b = Guard(idemtask_store), Guard(idemtask_store)

    def worker(guard: Guard) -> None:
        for key in keys:
            deferrals = 0  # carried from one delivery to the next, as an adapter does
            for _ in range(20):
                try:
                    call = Call("t", key, "")
                    delivery = guard.delivery(
                        policy, call, "id-" + key, JsonCodec(), deferrals=deferrals
                    )
                    delivery.run(body)
                    break
                except Deferred as deferred:
                    deferrals = deferred.deferrals or deferrals
                    time.sleep(min(deferred.delay, 0.1))
                except Exception:
                    break

    threads = [threading.Thread(target=worker, args=(g,)) for g in (guard_a, guard_b)]
    # guard_a must be the one holding the frozen key (its lease is the one dropped): the
    # other starts once it does, rather than racing it for the first acquire.
    threads[0].start()
    assert frozen_holds.wait(30), "guard_a never took the frozen key"
    threads[1].start()
    for t in threads:
        t.join()
    entries = idemtask_ledger.entries()
    assert_all_completed(entries, keys)
    assert_no_overlap(entries)
    assert_no_run_after_completion(entries)
    assert_single_effect(entries, fenced=True)
    report = analyse(entries, keys)
    assert report.stale_rejected >= 1 and report.fenced_rejected >= 1


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_faults_kill_and_stop_real_processes(
    idemtask_faults: Faults, idemtask_ledger: EffectLedger
) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
         " for _ in range(2)]\n"
         "time.sleep(60)"]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while len(children(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        kids = children(parent.pid)
        assert len(kids) == 2
        idemtask_faults.stop(kids[0])
        deadline = time.monotonic() + 5
        while _state(kids[0]) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(kids[0]) == "T"
        idemtask_faults.cont(kids[0])
        idemtask_faults.kill(kids[1])
        deadline = time.monotonic() + 5
        while kids[1] in children(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children(parent.pid) == [kids[0]]
        kinds = [(x.kind, x.pid) for x in idemtask_ledger.entries()]
        assert kinds == [("stopped", kids[0]), ("continued", kids[0]), ("killed", kids[1])]
    finally:
        parent.kill()
        parent.wait()
        for kid in children(parent.pid):
            subprocess.run(["kill", "-9", str(kid)], check=False)


def test_every_plugin_fixture_is_named_idemtask(tmp_path: Path) -> None:
    """The plugin loads into every pytest run of a project that installs idemtask: none of
    its fixtures may take a name that project could use for its own."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures", "-v", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode in (0, 5), done.stdout + done.stderr  # 5: no tests collected
    section = done.stdout.split("fixtures defined from idemtask.testing.plugin", 1)[1]
    section = section.split("\n-", 1)[0]
    names = [line.split()[0] for line in section.splitlines()[1:] if line and line[0] != " "]
    assert "idemtask_ledger" in names and "idemtask_faults" in names, names
    assert all(name.lstrip("_").startswith("idemtask_") for name in names), names
