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


@workflow.defn
class StartAndUpdate:
    """Started, then answered by one update, then done: the engine cost of a request that a
    workflow holds until someone answers it (the bare shape of a device command)."""

    def __init__(self) -> None:
        self._answer: int | None = None

    @workflow.run
    async def run(self) -> int:
        """Wait for the answer."""
        await workflow.wait_condition(lambda: self._answer is not None)
        assert self._answer is not None
        return self._answer

    @workflow.update
    def answer(self, value: int) -> int:
        """The answer."""
        self._answer = value
        return value
