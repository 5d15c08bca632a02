"""Results encoded with the app's own result serializer.

A replayed value must equal what a normal run hands back through the result backend: a
tuple comes back as a list under JSON, a datetime in Celery's JSON form, and so on. Using the
serializer the backend uses gives exactly that, with no second set of encoding rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu import serialization

from idemtask.errors import ConfigurationError

JSON = "application/json"
_SEPARATOR = b"\n"
_dumps: Callable[..., tuple[str, str, Any]] = serialization.dumps
_loads: Callable[..., Any] = serialization.loads
_encoders: dict[str, tuple[str, str, Any]] = serialization.registry._encoders


class CelerySerializerCodec:
    """Encodes with one kombu serializer.

    JSON results are stored as plain JSON, which the Dramatiq adapter reads too (one key
    space for both). Other serializers' bytes are prefixed with their content type, so a
    record written under another serializer is refused instead of misread, and an app that
    does not use pickle never unpickles a stored record.
    """

    def __init__(self, serializer: str) -> None:
        try:
            content_type, _encoding, _encoder = _encoders[serializer]
        except KeyError:
            raise ConfigurationError(
                f"result_serializer {serializer!r} is not a registered kombu serializer"
            ) from None
        self.serializer = serializer
        self.content_type: str = content_type

    def encode(self, value: Any) -> bytes:
        content_type, encoding, data = _dumps(value, serializer=self.serializer)
        body = data.encode(encoding or "utf-8") if isinstance(data, str) else bytes(data)
        if content_type == JSON:
            return body
        return f"{content_type}\n{encoding or ''}\n".encode("ascii") + body

    def decode(self, data: bytes) -> Any:
        data = bytes(data)
        if self.content_type == JSON:
            return _loads(data, JSON, "utf-8", accept={JSON})
        parts = data.split(_SEPARATOR, 2)
        kind = parts[0].decode("ascii", "replace") if len(parts) == 3 else "plain JSON"
        if kind != self.content_type:
            raise ValueError(
                f"stored result is {kind}, but this app's result serializer "
                f"{self.serializer!r} reads {self.content_type}"
            )
        return _loads(parts[2], kind, parts[1].decode("ascii"), accept={kind})
