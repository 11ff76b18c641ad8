"""The baseline every benchmark is compared with: a bare workflow of no-op activities."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow

BASELINE_QUEUE = "bench-baseline"


@activity.defn(name="bench.noop")
async def noop(step: int) -> int:
    """Does nothing; measures the engine's cost of one activity."""
    return step


@workflow.defn
class FiveActivities:
    """Five no-op activities in a row: the engine cost of a five-step saga, without its work."""

    @workflow.run
    async def run(self) -> int:
        """Run the five steps."""
        total = 0
        for step in range(5):
            total += await workflow.execute_activity(noop, step, start_to_close_timeout=timedelta(seconds=10))
        return total
