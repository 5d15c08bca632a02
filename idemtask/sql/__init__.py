"""Exactly-once database effects: the task's writes and an effect row for its key commit in
one transaction, so a redelivery after the commit replays the recorded value instead of
writing again. Needs SQLAlchemy 2 (the ``sql`` extra); imported only from here."""

from __future__ import annotations

from idemtask.sql.effects import Effect, StaleToken, atomic, run
from idemtask.sql.schema import effects_table, metadata

__all__ = ["Effect", "StaleToken", "atomic", "effects_table", "metadata", "run"]
