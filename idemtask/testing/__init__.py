"""Test your own tasks under faults: an effect ledger, fault injection and the checks.

The fixtures (``idemtask_redis``, ``idemtask_store``, ``idemtask_ledger``,
``idemtask_faults``) are there as soon as idemtask is installed (pytest entry point
``idemtask``); ``pytest -p no:idemtask`` turns them off. ``idemtask.testing.launcher``
starts throwaway ``redis-server`` processes; ``idemtask.testing.chaos`` runs whole
workloads under seeded faults.
"""

from idemtask.testing.checks import (
    Report,
    analyse,
    assert_all_completed,
    assert_no_ack_without_run,
    assert_no_overlap,
    assert_no_run_after_completion,
    assert_no_stale_completion,
    assert_single_effect,
    assert_tokens_increase,
)
from idemtask.testing.faults import Faults, children
from idemtask.testing.ledger import EffectLedger, Entry

__all__ = [
    "EffectLedger",
    "Entry",
    "Faults",
    "Report",
    "analyse",
    "assert_all_completed",
    "assert_no_ack_without_run",
    "assert_no_overlap",
    "assert_no_run_after_completion",
    "assert_no_stale_completion",
    "assert_single_effect",
    "assert_tokens_increase",
    "children",
]
