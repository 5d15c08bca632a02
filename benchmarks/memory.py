"""Store memory: one completed record, and ``used_memory`` after many.

Records are made the way tasks make them: reserve, acquire, complete, with a Celery-style
task id (a UUID), a 32-hex fingerprint and a small JSON result. The single record goes
through the ``RedisStore`` API. The bulk fill sends the very same scripts with the same
arguments, pipelined 500 tasks at a time, because 300,000 one-by-one round trips would only
measure the network; a sample of bulk records is checked against the API-made one (same
fields, same ``MEMORY USAGE``).
"""

from __future__ import annotations

import uuid
from typing import Any

from idemtask.store.base import Acquired
from idemtask.store.redis import RedisStore, script_source
from idemtask.testing.launcher import RedisServer

TASK_NAME = "shop.tasks.charge_order"
RESULT = b'{"charged": 4990}'
LEASE_MS = 60_000
TTL_MS = 86_400_000


def _ids() -> tuple[str, str, str, str]:
    key = uuid.uuid4().hex
    return key, str(uuid.uuid4()), uuid.uuid4().hex, uuid.uuid4().hex


def bench_memory(records: int) -> dict[str, Any]:
    """``MEMORY USAGE`` of one record and the ``used_memory`` delta per record for
    ``records`` completed keys, on a fresh server of its own."""
    with RedisServer(config={"maxmemory-policy": "noeviction"}) as server:
        client = server.client()
        try:
            store = RedisStore(client)
            one = _api_record(store)
            usage_one = int(client.memory_usage(store.record_name(one), samples=0) or 0)
            encoding = _text(client.object("encoding", store.record_name(one)))
            client.flushall()
            _api_record(store)  # scripts loaded, connection made
            client.flushall()
            before = int(client.info("memory")["used_memory"])
            names = _bulk_fill(client, store, records)
            after = int(client.info("memory")["used_memory"])
            sample = [
                int(client.memory_usage(name, samples=0) or 0) for name in names[:: records // 20]
            ]
            fields = sorted(client.hkeys(names[0]))
            assert fields == sorted(client.hkeys(names[-1]))
        finally:
            client.close()
    per_record = (after - before) / records
    return {
        "result_bytes": len(RESULT),
        "memory_usage_one_record": usage_one,
        "memory_usage_beyond_result": usage_one - len(RESULT),
        "encoding": encoding,  # listpack unless a field outgrew hash-max-listpack-value
        "bulk_sample_memory_usage": sorted(set(sample)),
        "records": records,
        "used_memory_delta": after - before,
        "used_memory_per_record": per_record,
        "used_memory_per_record_beyond_result": per_record - len(RESULT),
        "fields": [_text(f) for f in fields],
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _api_record(store: RedisStore) -> str:
    key, task_id, attempt, fingerprint = _ids()
    store.reserve(
        key,
        task_id=task_id,
        task_name=TASK_NAME,
        fingerprint=fingerprint,
        reservation_ms=3_600_000,
        ttl_ms=TTL_MS,
    )
    acquired = store.acquire(
        key,
        task_id=task_id,
        attempt_id=attempt,
        task_name=TASK_NAME,
        fingerprint=fingerprint,
        lease_ms=LEASE_MS,
        max_deliveries=5,
        ttl_ms=TTL_MS,
    )
    assert isinstance(acquired, Acquired), acquired
    store.complete(
        key, attempt_id=attempt, token=acquired.token, result=RESULT, result_ttl_ms=TTL_MS
    )
    return key


def _bulk_fill(client: Any, store: RedisStore, records: int) -> list[str]:
    """The three scripts per record, with the arguments RedisStore sends, pipelined."""
    reserve, acquire, complete = (
        client.register_script(script_source(name)) for name in ("reserve", "acquire", "complete")
    )
    names: list[str] = []
    batch = 500
    for start in range(0, records, batch):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(batch, records - start)):
            key, task_id, attempt, fingerprint = _ids()
            name = store.record_name(key)
            names.append(name)
            reserve(
                keys=[name],
                args=[task_id, TASK_NAME, fingerprint, 3_600_000, TTL_MS],
                client=pipe,
            )
            acquire(
                keys=[name],
                args=[task_id, attempt, TASK_NAME, fingerprint, LEASE_MS, 5, TTL_MS],
                client=pipe,
            )
            # The first acquire of a reserved key always gets token 1.
            complete(keys=[name], args=[attempt, 1, "1", RESULT, TTL_MS], client=pipe)
        for reply in pipe.execute():
            assert not isinstance(reply, Exception), reply
    return names
