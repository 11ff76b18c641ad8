"""Saga compensation in workflow code: each step registers its undo, run in reverse."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

from temporalio.common import RetryPolicy

# compensations must eventually succeed: retried without limit, backing off to a minute
COMPENSATION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)  # fmt: skip

Undo = Callable[[], Awaitable[object]]


class Saga:
    """An ordered list of undo actions.

    Register the undo *before* running its step: an activity can commit and then
    fail to report, so the undo must be there either way (undos are idempotent).
    """

    def __init__(self) -> None:
        self._undo: list[tuple[str, Undo]] = []
        self.done: list[str] = []

    def add(self, name: str, undo: Undo) -> None:
        """Register the undo of the step about to run."""
        self._undo.append((name, undo))

    async def compensate(self) -> list[str]:
        """Run every registered undo, last first; returns their names in run order."""
        while self._undo:
            name, undo = self._undo.pop()
            await undo()
            self.done.append(name)
        return self.done
