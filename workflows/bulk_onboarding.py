"""BulkOnboarding: up to 10,000 devices in batched activities, not one workflow each.

The device list travels as a claim check; each slice is provisioned in one activity
(per-device all-or-nothing), then its `DeviceOnboarded` events are recorded. A slice
whose events cannot be recorded is deprovisioned; cancellation deprovisions all.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import DomainEvent, TaskQueue, tenant_scoped_id
    from fleetflow.contracts.devices import (
        BulkChunk,
        BulkChunkResult,
        BulkOnboardingInput,
        BulkProgress,
        DeviceBatch,
        DeviceFailure,
    )
    from fleetflow.contracts.events import DEVICE_ONBOARDED, EventBatch
    from workflows.options import (
        COMPENSATION_START_TO_CLOSE,
        STEP_RETRY,
        STEP_SCHEDULE_TO_CLOSE,
    )
    from workflows.saga import COMPENSATION_RETRY

CREDENTIAL_LIFETIME = timedelta(days=365)
PARALLEL_SLICES = 2


def bulk_workflow_id(tenant: str, bulk_id: str) -> str:
    """The business id of a bulk onboarding workflow."""
    return tenant_scoped_id("bulk-onboard", tenant, bulk_id)


@workflow.defn
class BulkOnboarding:
    """Onboards a stored device list slice by slice; query `progress` gives counts."""

    def __init__(self) -> None:
        self._input: BulkOnboardingInput | None = None
        self._status = "running"
        self._processed = 0
        self._onboarded: list[str] = []
        self._failures: list[DeviceFailure] = []
        self._reason: str | None = None

    @workflow.run
    async def run(self, inp: BulkOnboardingInput) -> BulkProgress:
        """Provision every slice; returns the final counts and every failure."""
        self._input = inp
        issued = workflow.now()
        offsets = list(range(0, inp.total, inp.chunk_size))
        gate = asyncio.Semaphore(PARALLEL_SLICES)
        try:
            await asyncio.gather(*(self._slice(inp, o, issued, gate) for o in offsets))
        except asyncio.CancelledError:
            await self._undo_all(inp, "bulk onboarding cancelled by an operator", "cancelled")
            raise
        except ActivityError as exc:
            reason = f"bulk onboarding failed: {exc.cause or exc}"
            await self._undo_all(inp, reason, "failed")
            raise ApplicationError(reason, type="BulkOnboardingFailed", non_retryable=True) from None
        self._status = "completed"
        return self.progress()

    async def _slice(
        self, inp: BulkOnboardingInput, offset: int, issued: datetime, gate: asyncio.Semaphore
    ) -> None:
        async with gate:
            now = workflow.now()
            chunk = BulkChunk(
                tenant=inp.tenant, bulk_id=inp.bulk_id, claim_id=inp.claim_id, offset=offset,
                limit=min(inp.chunk_size, inp.total - offset), actor=inp.actor.subject,
                issued_at=issued, expires_at=issued + CREDENTIAL_LIFETIME,
            )  # fmt: skip
            result: BulkChunkResult = await workflow.execute_activity(
                "device.provision_batch", chunk, task_queue=TaskQueue.DEVICE.value,
                result_type=BulkChunkResult, start_to_close_timeout=timedelta(minutes=2),
                schedule_to_close_timeout=STEP_SCHEDULE_TO_CLOSE, retry_policy=STEP_RETRY,
            )  # fmt: skip
            self._onboarded.extend(result.onboarded)
            self._failures.extend(result.failed)
            if result.onboarded:
                await self._record_events(inp, result.onboarded, now)
            self._processed += chunk.limit

    async def _record_events(self, inp: BulkOnboardingInput, device_ids: list[str], at: datetime) -> None:
        events = [
            DomainEvent(
                event_id=f"{inp.bulk_id}/{device_id}/{DEVICE_ONBOARDED}",
                tenant=inp.tenant,
                device_id=device_id,
                type=DEVICE_ONBOARDED,
                occurred_at=at,
                actor=inp.actor.subject,
                source_workflow=workflow.info().workflow_id,
                data={"bulk_id": inp.bulk_id},
            )
            for device_id in device_ids
        ]
        try:
            await workflow.execute_activity(
                "notification.record_events", EventBatch(events=events),
                task_queue=TaskQueue.NOTIFICATION.value, start_to_close_timeout=timedelta(minutes=1),
                schedule_to_close_timeout=STEP_SCHEDULE_TO_CLOSE, retry_policy=STEP_RETRY,
            )  # fmt: skip
        except ActivityError as exc:
            # the devices of this slice are undone one by one and reported as failed
            reason = f"event not recorded: {exc.cause or exc}"
            await self._deprovision(inp, device_ids, reason)
            gone = set(device_ids)
            self._onboarded = [d for d in self._onboarded if d not in gone]
            self._failures.extend(DeviceFailure(index=-1, device_id=d, reason=reason) for d in device_ids)

    async def _deprovision(self, inp: BulkOnboardingInput, device_ids: list[str] | None, reason: str) -> None:
        await workflow.execute_activity(
            "device.deprovision_batch",
            DeviceBatch(tenant=inp.tenant, bulk_id=inp.bulk_id, device_ids=device_ids,
                        reason=reason, actor=inp.actor.subject),
            task_queue=TaskQueue.DEVICE.value, start_to_close_timeout=COMPENSATION_START_TO_CLOSE,
            retry_policy=COMPENSATION_RETRY,
        )  # fmt: skip

    async def _undo_all(self, inp: BulkOnboardingInput, reason: str, status: str) -> None:
        self._status, self._reason = "compensating", reason
        # None: every device of this import, including a slice cut short mid-flight
        await self._deprovision(inp, None, reason)
        self._onboarded = []
        self._status = status

    @workflow.query
    def progress(self) -> BulkProgress:
        """Counts so far and every failure with its reason."""
        inp = self._input
        return BulkProgress(
            bulk_id=inp.bulk_id if inp else "", status=self._status,
            total=inp.total if inp else 0, processed=self._processed,
            onboarded=len(self._onboarded), failed=len(self._failures),
            failures=list(self._failures), reason=self._reason,
        )  # fmt: skip
