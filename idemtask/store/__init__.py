"""Record stores: the protocol, the Redis store for workers, the in-process store."""

from idemtask.store.base import Lease, Outcome, Record, State, Status, Store, StoredResult
from idemtask.store.memory import MemoryStore
from idemtask.store.redis import RedisStore

__all__ = [
    "Lease",
    "MemoryStore",
    "Outcome",
    "Record",
    "RedisStore",
    "State",
    "Status",
    "Store",
    "StoredResult",
]
