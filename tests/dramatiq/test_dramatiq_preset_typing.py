"""The documented preset call type-checks under ``mypy --strict``, as users' code will."""

from __future__ import annotations

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

DOCUMENTED = """
from idemtask.dramatiq import IdempotencyMiddleware, presets

preset = presets.at_least_once(lease=60, time_limit=600)
middleware = IdempotencyMiddleware(redis_url="redis://127.0.0.1:6379/1", **preset.idemtask)
"""


def test_the_documented_preset_call_type_checks(tmp_path: Path) -> None:
    source = tmp_path / "app.py"
    source.write_text(DOCUMENTED)
    out, err, status = mypy_api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)]
    )
    assert status == 0, out + err
