"""Results are stored with the broker's own encoder, so a replayed value is exactly what a
normal run gives back through the Results backend (a tuple comes back as a list in both)."""

from __future__ import annotations

from typing import Any

import dramatiq


class EncoderCodec:
    """Encode with ``dramatiq.get_encoder()``, looked up at each call: the encoder may be set
    after the middleware is created, and the Results backend uses the same lookup."""

    def encode(self, value: Any) -> bytes:
        return dramatiq.get_encoder().encode(value)

    def decode(self, data: bytes) -> Any:
        return dramatiq.get_encoder().decode(data)
