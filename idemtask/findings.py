"""Doctor findings: one checked invariant each, with the fix when it is violated."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from idemtask.redact import redact_text


class Level(str, enum.Enum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    code: str  # stable identifier, e.g. "celery.visibility_timeout"
    message: str  # what was found, with the values read
    fix: str = ""  # what to change, when level is not OK

    def __post_init__(self) -> None:
        # Findings quote settings and error messages: no URL's password gets through.
        object.__setattr__(self, "message", redact_text(self.message))
        object.__setattr__(self, "fix", redact_text(self.fix))

    def __str__(self) -> str:
        text = f"[{self.level.value.upper()}] {self.code}: {self.message}"
        return f"{text} -> {self.fix}" if self.fix else text


#: How bad each level is, for a threshold such as ``idemtask doctor --fail-level``.
SEVERITY = {Level.OK: 0, Level.WARNING: 1, Level.ERROR: 2}


def has_errors(findings: list[Finding]) -> bool:
    return at_or_above(findings, Level.ERROR)


def at_or_above(findings: list[Finding], level: Level) -> bool:
    """Is any finding at least as bad as ``level``?"""
    return any(SEVERITY[f.level] >= SEVERITY[level] for f in findings)
