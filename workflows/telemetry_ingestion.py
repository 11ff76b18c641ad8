"""TelemetryIngestion: drains one shard of acknowledged batches, a window at a time
(id `ingest-{shard}`): claim → device check → store → TelemetryStored → analyse → alerts.

One workflow per shard runs for ever, continuing as new every few hundred windows. A
window carries only a reference to its batches (claim check), never readings, so
history stays small whatever the volume.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import DomainEvent, TaskQueue
    from fleetflow.contracts.events import EventBatch
    from fleetflow.contracts.telemetry import (
        TELEMETRY_STORED,
        ClaimWindow,
        Evaluated,
        IngestionInput,
        IngestionProgress,
        Stored,
        StoreWindow,
        UnreadyDevices,
        Window,
        WindowRef,
    )

# storage must not give up: an acknowledged batch is retried until it is stored
RETRY_FOREVER = RetryPolicy(
    initial_interval=timedelta(milliseconds=200), backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
)  # fmt: skip
# short: a killed worker's activity is retried elsewhere after this long (store_window heartbeats)
STEP_TIMEOUT = timedelta(seconds=30)
# storing heartbeats: the attempt of a killed data worker is retried after this, not STEP_TIMEOUT
STORE_HEARTBEAT = timedelta(seconds=10)


def ingestion_id(shard: int) -> str:
    """The business id of a shard's ingestion workflow."""
    return f"ingest-{shard}"


@workflow.defn
class TelemetryIngestion:
    """A shard's durable consumer; query `progress`."""

    def __init__(self) -> None:
        self._progress: IngestionProgress | None = None

    @workflow.run
    async def run(self, inp: IngestionInput) -> None:
        """Process windows until it is time to continue as new."""
        self._progress = IngestionProgress(
            shard=inp.shard, windows=inp.windows_done, readings=inp.readings_done, last_window=None,
            last_window_readings=0,
        )  # fmt: skip
        run_id = workflow.info().run_id
        for i in range(inp.windows_per_run):
            window_id = f"{workflow.info().workflow_id}/{run_id}/{i}"
            window: Window = await workflow.execute_activity(
                "data.claim_window",
                ClaimWindow(window_id=window_id, shard=inp.shard, shards=inp.shards,
                            max_readings=inp.max_window_readings, max_wait_ms=inp.max_wait_ms),
                task_queue=TaskQueue.DATA.value, result_type=Window,
                start_to_close_timeout=timedelta(milliseconds=inp.max_wait_ms) + timedelta(seconds=30),
                heartbeat_timeout=timedelta(seconds=10), retry_policy=RETRY_FOREVER,
            )  # fmt: skip
            if window.batches:
                await self._process(window)
        workflow.continue_as_new(
            inp.model_copy(
                update={"windows_done": self._progress.windows, "readings_done": self._progress.readings}
            )
        )

    async def _process(self, window: Window) -> None:
        ref = WindowRef(window_id=window.window_id)
        unready: UnreadyDevices = await self._step(
            "device.find_unready", ref, TaskQueue.DEVICE, UnreadyDevices
        )
        stored: Stored = await self._step(
            "data.store_window", StoreWindow(window_id=window.window_id, quarantine=unready.devices),
            TaskQueue.DATA, Stored, heartbeat_timeout=STORE_HEARTBEAT,
        )  # fmt: skip
        now = workflow.now()
        events = [
            DomainEvent(
                event_id=f"{window.window_id}/{tenant}/{TELEMETRY_STORED}",
                tenant=tenant,
                type=TELEMETRY_STORED,
                occurred_at=now,
                actor="ingestion",
                source_workflow=workflow.info().workflow_id,
                data={"window_id": window.window_id, **counts},
            )
            for tenant, counts in sorted(stored.by_tenant.items())
        ]
        evaluated: Evaluated = await self._step("analytics.evaluate", ref, TaskQueue.ANALYTICS, Evaluated)
        events.extend(evaluated.events)
        for start in range(0, len(events), 1000):
            await self._step(
                "notification.record_events", EventBatch(events=events[start : start + 1000]),
                TaskQueue.NOTIFICATION, int,
            )  # fmt: skip
        assert self._progress is not None
        self._progress.windows += 1
        self._progress.readings += stored.stored
        self._progress.last_window, self._progress.last_window_readings = window.window_id, window.readings

    async def _step(
        self, activity: str, arg: object, queue: TaskQueue, result_type: type,
        heartbeat_timeout: timedelta | None = None,
    ) -> Any:  # fmt: skip
        return await workflow.execute_activity(
            activity, arg, task_queue=queue.value, result_type=result_type,
            start_to_close_timeout=STEP_TIMEOUT, heartbeat_timeout=heartbeat_timeout,
            retry_policy=RETRY_FOREVER,
        )  # fmt: skip

    @workflow.query
    def progress(self) -> IngestionProgress | None:
        """Windows and readings processed by this shard, across its runs."""
        return self._progress
