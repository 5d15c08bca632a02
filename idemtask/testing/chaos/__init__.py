"""Chaos scenarios: real brokers, real worker processes, a seeded schedule of faults, and
the guarantees checked from the effect ledger.

``python -m idemtask.testing.chaos --framework celery --keys 10000 --seed 1`` runs one
scenario from the command line; ``run_scenario`` runs one from Python (the test suite's
short runs do). Worker and producer processes import
``celery_app``, ``dramatiq_app`` and
``producer``, configured through ``IDTCHAOS_*`` variables
that the runner sets.
"""

from idemtask.testing.chaos.runner import SCENARIOS, Result, Scenario, run_scenario

__all__ = ["SCENARIOS", "Result", "Scenario", "run_scenario"]
