"""Stored results use the app's result serializer: plain JSON by default, tagged otherwise."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from idemtask.celery.codec import CelerySerializerCodec
from idemtask.errors import ConfigurationError

pytestmark = pytest.mark.celery


def test_json_results_are_plain_json_with_celerys_types() -> None:
    codec = CelerySerializerCodec("json")
    data = codec.encode({"pair": (1, 2), "none": None})
    assert json.loads(data) == {"pair": [1, 2], "none": None}  # readable by any JSON reader
    assert codec.decode(data) == {"pair": [1, 2], "none": None}
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert codec.decode(codec.encode(moment)) == moment  # kombu's JSON keeps datetimes
    assert codec.decode(codec.encode(None)) is None


def test_other_serializers_are_tagged_and_never_confused() -> None:
    pickled = CelerySerializerCodec("pickle")
    data = pickled.encode({"pair": (1, 2)})
    assert data.startswith(b"application/x-python-serialize\n")
    assert pickled.decode(data) == {"pair": (1, 2)}
    with pytest.raises(ValueError):
        pickled.decode(CelerySerializerCodec("json").encode([1]))
    with pytest.raises(Exception):  # noqa: B017 - kombu's DecodeError: JSON never unpickles
        CelerySerializerCodec("json").decode(data)
    with pytest.raises(ConfigurationError):
        CelerySerializerCodec("no-such-serializer")
