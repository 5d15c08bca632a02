"""The fault schedule of a scenario fits the span in which bodies still run."""

from __future__ import annotations

from typing import Any

import pytest

from idemtask.testing.chaos import Scenario
from idemtask.testing.chaos.runner import BROKER_RESTART_ESTIMATE

QUIET = {"kills": 0, "kills_after_end": 0, "stops": 0, "store_restarts": 0}


@pytest.mark.parametrize(
    "faults",
    [
        {"ooms": 1, "readonlys": 1, "misconfs": 1, "error_seconds": 3.0, **QUIET},
        {"ooms": 2, "error_seconds": 2.0, "kills": 2, "kills_after_end": 0},
        {
            "framework": "dramatiq",
            "broker": "rabbitmq",
            "broker_restarts": 1,
            "readonlys": 1,
            "duration": 30.0,
        },
    ],
    ids=["error-replies", "errors-and-kills", "broker-restart"],
)
def test_the_last_fault_ends_within_the_first_70_percent_of_the_run(faults: Any) -> None:
    """Error replies and broker restarts hold the schedule while they last: if the gaps did
    not leave room for them, the last fault would fall after the submissions, when no body
    runs any more to feel it, and be skipped."""
    options = {"framework": "celery", "duration": 16.0} | faults
    scenario = Scenario(**options)
    held = scenario.broker_restarts * BROKER_RESTART_ESTIMATE
    held += (scenario.ooms + scenario.readonlys + scenario.misconfs) * scenario.error_seconds
    interval, count = scenario.fault_interval, len(scenario.schedule())
    last_ends = interval / 2 + (count - 1) * interval + held
    assert last_ends <= 0.7 * scenario.duration
