"""Losing a host (bench.hosts, smaller): three test hosts in network namespaces, host B's
processes SIGKILLed and its link cut under load with onboardings, a rollout and a
decommission in flight. Nothing acknowledged is lost, and every run finishes on host C."""

from __future__ import annotations

import pytest

from bench.hosts import run, scratch
from bench.netns_hosts import unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"test hosts cannot be made here: {REASON}")


@pytest.mark.timeout(900)
async def test_losing_a_host_loses_no_acknowledged_reading_and_its_runs_finish_on_the_other() -> None:
    with scratch() as root:
        figures = await run(devices=20, rate=200.0, duration_s=30.0, kill_at_s=12.0, root=root)
    print(figures)
    assert figures.processes_killed_on_b == 6  # a worker of every queue
    assert figures.readings_acknowledged > 0 and figures.readings_rejected == 0
    assert figures.readings_stored == figures.readings_acknowledged
    assert figures.workflows_in_flight_at_loss > 0
    assert figures.unfinished == []
    assert figures.workflows_finished_on_c == figures.workflows_in_flight_at_loss
