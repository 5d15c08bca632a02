"""What only MemoryStore has: a controllable clock, and records dropped when they expire."""

from __future__ import annotations

from idemtask.store import Lease, MemoryStore, Status


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


ACQUIRE = {"task_name": "n", "fingerprint": "", "max_deliveries": 5}


def test_expired_records_are_dropped_without_being_touched_again() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    for i in range(50_000):
        token = store.acquire(
            f"k{i}", task_id="t", attempt_id="a", lease_ms=1_000, ttl_ms=60_000, **ACQUIRE
        ).token
        store.complete(f"k{i}", attempt_id="a", token=token, result=b"1", result_ttl_ms=60_000)
    assert store.records_held() == 50_000
    clock.now += 3_600
    store.reserve("other", task_id="t", task_name="n", fingerprint="", reservation_ms=1, ttl_ms=1)
    assert store.records_held() == 1


def test_a_renewed_record_is_not_dropped_at_its_first_deadline() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    out = store.acquire("k", task_id="t", attempt_id="a", lease_ms=1_000, ttl_ms=1_000, **ACQUIRE)
    for _ in range(10):  # 10 s of renewals every 0.5 s, far past the first deadline (2 s)
        clock.now += 0.5
        assert store.renew(Lease("k", "a", out.token, 1_000)) is True
    clock.now += 1.5  # lease over, but the record lives the result TTL longer
    assert store.records_held() == 1
    again = store.acquire("k", task_id="t", attempt_id="b", lease_ms=1_000, ttl_ms=1_000, **ACQUIRE)
    assert (again.status, again.token, again.deliveries) == (Status.ACQUIRED, 2, 2)
    clock.now += 2.1  # past the new lease + result TTL: gone
    assert store.inspect("k") is None and store.records_held() == 0
    assert store.forget("k") is False
