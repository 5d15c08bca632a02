"""Result encoding. Adapters pass the framework's own serializer so a replayed value equals
what a normal run returns through the framework's result path."""

from __future__ import annotations

import json
from typing import Any, Protocol


class Codec(Protocol):
    """Turns a task's return value into bytes for the store, and back."""

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class JsonCodec:
    """Strict JSON (no NaN), the default when no framework serializer is given."""

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()

    def decode(self, data: bytes) -> Any:
        return json.loads(data)
