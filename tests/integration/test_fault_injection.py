"""Fault injection under the coherence checker: each scenario must end with zero violations.

Each scenario (``hmmctl check --scenario NAME``) adds its own assertions to the
run (the victim died or was evicted, nobody else waited past the ack deadline,
agents registered again, the old (pid, start time) was refused...); a failed
one is reported as a violation, as is any stale translation or impossible
READ. The whole run is bounded in time.
"""

from __future__ import annotations

import time

import pytest
from hmmirror.tools.check import Checker, Options

SCENARIOS = ["agent-kill", "agent-stop", "hmmd-restart", "target-exit", "pid-reuse", "hwm",
             "slow-agent"]  # fmt: skip


@pytest.mark.timeout(150)
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_scenario_has_no_violation(scenario: str) -> None:
    """The scenario runs to the end, in bounded time, with zero violations."""
    t0 = time.monotonic()
    report = await Checker(Options(seed=21, duration=3.0, agents=3, scenario=scenario)).run()
    elapsed = time.monotonic() - t0
    detail = "\n".join(f"{k}: {d}" for k, d in report.violations[:20]) + f"\n{report.notes}"
    assert not report.violations, detail
    assert report.rounds >= 2
    assert elapsed < 90, f"{scenario} took {elapsed:.0f} s"
