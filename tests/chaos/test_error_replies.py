"""The store error-reply faults on a real redis-server: each one makes writes fail with its
production error, keeps every record, and is undone completely."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from idemtask.testing.faults import ErrorReplies

from servers import LOOPBACK, RedisServer

#: What redis-py raises for each error reply (it turns the error code into the class).
EXPECTED: dict[str, tuple[type[redis.ResponseError], str]] = {
    "oom": (redis.exceptions.OutOfMemoryError, "used memory > 'maxmemory'"),
    "readonly": (redis.exceptions.ReadOnlyError, "read only replica"),
    "misconf": (redis.ResponseError, "MISCONF"),
}


@pytest.mark.parametrize("kind", ErrorReplies.KINDS)
def test_each_error_reply_fault_refuses_writes_and_loses_nothing(
    kind: str, fresh_redis: Callable[..., RedisServer], tmp_path: Path
) -> None:
    store = fresh_redis(appendonly=True, config={"enable-protected-configs": "yes"})
    master = fresh_redis()
    master_client = master.client()
    master_client.config_set("requirepass", "refuse-every-replica")
    master_client.close()
    client = store.client()
    client.mset({f"record:{n}": str(n) for n in range(100)})
    faults = ErrorReplies(client, scratch=tmp_path, refusing_master=(LOOPBACK, master.port))

    faults.begin(kind)
    error, text = EXPECTED[kind]
    with pytest.raises(error, match=text):  # a script's write, as the store's Lua does
        client.eval("return redis.call('SET', KEYS[1], 'x')", 1, "record:new")
    assert client.get("record:7") == b"7"  # reads are still served
    faults.end(kind)

    client.set("record:new", "after")
    assert client.dbsize() == 101
    store.restart()  # and the append-only file holds every record
    client = store.client()
    assert client.dbsize() == 101
    assert (client.get("record:99"), client.get("record:new")) == (b"99", b"after")
    client.close()
