"""Saga compensation in workflow code: each step registers its undo, run in reverse."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

# compensations must eventually succeed: retried without limit, backing off to a minute
COMPENSATION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)

Undo = Callable[[], Awaitable[object]]
T = TypeVar("T")


async def run_to_end(task: asyncio.Future[Any], on_cancel: Callable[[], object] | None = None) -> bool:
    """Wait until task is done, whatever cancels the caller meanwhile; True when a cancel arrived.

    The caller's cancellation is not passed to task (on_cancel is called instead, once), so a
    step or an undo in flight finishes and its outcome is known before anything else runs.
    """
    cancelled = False
    while not task.done():
        try:
            await workflow.wait([task])
        except asyncio.CancelledError:
            if not cancelled and on_cancel is not None:
                on_cancel()
            cancelled = True
            current = asyncio.current_task()
            if current is not None:  # the cancel is handled here: later awaits must not see it again
                current.uncancel()
    return cancelled


async def finish_then_cancel(step: Awaitable[T], *, forward: bool = True) -> T:
    """Run step to its end; if the caller was cancelled meanwhile, raise CancelledError after it.

    For a step whose effect must be known before compensating: an activity started with
    `WAIT_CANCELLATION_COMPLETED` is asked to stop (forward, the default), and its commit (if
    it made one) is in the database before the caller's undo runs.
    """
    task = asyncio.ensure_future(step)
    if await run_to_end(task, on_cancel=task.cancel if forward else None):
        if not task.cancelled():
            task.exception()  # retrieved: the cancel decides the outcome
        raise asyncio.CancelledError
    return task.result()


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

    def discard(self, name: str) -> None:
        """Drop the last registered undo called name: its step is known to have done nothing."""
        for i in range(len(self._undo) - 1, -1, -1):
            if self._undo[i][0] == name:
                del self._undo[i]
                return

    async def compensate(self, *, shielded: bool = True) -> list[str]:
        """Run every registered undo, last first; returns their names in run order.

        Shielded (the default), a cancel that arrives meanwhile neither interrupts the undo in
        flight nor skips the rest: compensation always finishes. `shielded=False` is the old
        behaviour, for runs recorded before it.
        """
        if shielded:
            task = asyncio.ensure_future(self._run_all())
            await run_to_end(task)
            return task.result()
        return await self._run_all()

    async def _run_all(self) -> list[str]:
        while self._undo:
            name, undo = self._undo.pop()
            await undo()
            self.done.append(name)
        return self.done
