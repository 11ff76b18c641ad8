"""IngestionSupervisor (id `ingest-supervisor`): the watchdog of telemetry ingestion.

Every `interval_s` it runs `data.supervise_ingestion`, which starts again any shard
workflow (`ingest-<n>`) that failed or was terminated and puts the batches claimed by
runs that are gone back to pending; windows such a run stored but did not finish are
analysed and their events recorded here (both steps are idempotent by window id). It
carries nothing but its input, and continues as new after `checks_per_run` checks. The
API starts it (and the shards) at start-up.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.telemetry import Supervised, SuperviseIngestion, WindowRef
    from fleetflow.interfaces.analytics import AnalyticsActivities
    from fleetflow.interfaces.data import DataActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from workflows import calls

CHECK_TIMEOUT = timedelta(seconds=60)
CHECK_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


@workflow.defn
class IngestionSupervisor:
    """Keeps every ingestion shard running; query `last_check`."""

    def __init__(self) -> None:
        self._last: Supervised | None = None

    @workflow.run
    async def run(self, inp: SuperviseIngestion) -> None:
        """Check, sleep, repeat; continue as new after checks_per_run checks."""
        for _ in range(inp.checks_per_run):
            self._last = await calls.execute(
                DataActivities.supervise_ingestion,
                inp,
                start_to_close_timeout=CHECK_TIMEOUT,
                retry_policy=CHECK_RETRY,
            )
            for window_id in self._last.orphans:
                try:
                    await self._finish(window_id)
                except ActivityError as err:  # a poisoned analysis: the readings are stored
                    workflow.logger.warning("window %s left unfinished: %s", window_id, err.cause)
            if workflow.info().is_continue_as_new_suggested():
                break
            await workflow.sleep(timedelta(seconds=inp.interval_s))
        workflow.continue_as_new(inp)

    async def _finish(self, window_id: str) -> None:
        """Analyse a stored window and record its events, as its dead shard run would have."""
        ref = WindowRef(window_id=window_id, counts_only=True)
        await calls.execute(
            AnalyticsActivities.evaluate,
            ref,
            start_to_close_timeout=CHECK_TIMEOUT,
            retry_policy=CHECK_RETRY,
        )
        await calls.execute(
            NotificationActivities.record_window_events,
            ref,
            start_to_close_timeout=CHECK_TIMEOUT,
            heartbeat_timeout=timedelta(seconds=10),
            retry_policy=CHECK_RETRY,
        )

    @workflow.query
    def last_check(self) -> Supervised | None:
        """What the last check started and reclaimed."""
        return self._last
