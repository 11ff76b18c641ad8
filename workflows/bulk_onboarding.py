"""BulkOnboarding: up to 10,000 devices in batched activities, not one workflow each.

The device list travels as a claim check; each slice is provisioned in one activity
(per-device all-or-nothing), then its `DeviceOnboarded` events are recorded by one activity
that reads the slice's devices itself (no event in the history) while the next slice
provisions. A slice whose events cannot be recorded is deprovisioned. When a slice fails or the run is
cancelled, no slice starts any more, the running ones are asked to stop (the activity
heartbeats and rolls back) and waited for, and only then is everything deprovisioned and
its `DeviceOnboarded` events retracted, shielded from a further cancel. The progress query
lists the failures a page at a time (a query's answer is one payload of at most 2 MiB).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import DomainEvent, tenant_scoped_id
    from fleetflow.contracts.devices import (
        BulkChunk,
        BulkOnboardingInput,
        BulkProgress,
        DeviceBatch,
        DeviceFailure,
        attempt_owner,
    )
    from fleetflow.contracts.events import DEVICE_ONBOARDED, BulkOnboardedEvents, EventBatch, RetractEvents
    from fleetflow.interfaces.device import DeviceActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from workflows import calls
    from workflows.options import (
        COMPENSATION_START_TO_CLOSE,
        STEP_RETRY,
        STEP_SCHEDULE_TO_CLOSE,
    )
    from workflows.saga import COMPENSATION_RETRY, run_to_end

CREDENTIAL_LIFETIME = timedelta(days=365)
# each device's credential lives as long as its type says (runs recorded before: 365 days)
LIFETIME_PATCH = "bulk-credential-lifetime-per-type"
PARALLEL_SLICES = 2
# runs started before it: the bulk id owned the devices, and a failure or cancel deprovisioned
# while other slices were still provisioning
ATTEMPTS_PATCH = "bulk-onboarding-attempts"
# the largest payloads of a history event stay far below 256 KiB with 128-character device ids
EVENTS_PER_ACTIVITY = 200
RESULT_FAILURES = 200
# a query's answer is one payload, refused by the server past 2 MiB: 10,000 failures with
# 128-character ids and 200-character reasons are ~3.7 MB, so the query pages them
PROGRESS_FAILURES = 1000
FAILURE_REASON = 200  # as device.provision_batch cuts its own
PROVISION_HEARTBEAT = timedelta(seconds=20)
# runs started before it: undoing devices left their DeviceOnboarded events recorded
RETRACT_PATCH = "bulk-onboarding-retract-events"
# runs started before it recorded a slice's event batches one after the other
EVENTS_AT_ONCE_PATCH = "bulk-onboarding-events-at-once"
# runs started before it carried each DeviceOnboarded event through the history (200 a task) and
# kept their slice's place until its events were recorded: now one activity a slice reads the
# devices it records (no event in the history) while the next slice provisions
EVENTS_BY_REF_PATCH = "bulk-onboarding-events-by-ref"


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
        self._attempts = False  # ATTEMPTS_PATCH
        self._owner = ""
        self._event_key = ""
        self._stopping = False
        self._by_ref = False  # EVENTS_BY_REF_PATCH

    @workflow.run
    async def run(self, inp: BulkOnboardingInput) -> BulkProgress:
        """Provision every slice; returns the final counts and the first failures."""
        self._input = inp
        self._attempts = workflow.patched(ATTEMPTS_PATCH)
        self._by_ref = self._attempts and workflow.patched(EVENTS_BY_REF_PATCH)
        # devices and credentials are owned by this attempt: a new run of the same bulk id (after
        # a failure or cancel) must not take the earlier run's undone devices for its own
        info = workflow.info()
        run = info.first_execution_run_id
        self._owner = attempt_owner(inp.bulk_id, run) if self._attempts else inp.bulk_id
        # event ids name the tenant (the workflow id does) and the attempt
        self._event_key = attempt_owner(info.workflow_id, run) if self._attempts else inp.bulk_id
        issued = workflow.now()
        offsets = list(range(0, inp.total, inp.chunk_size))
        gate = asyncio.Semaphore(PARALLEL_SLICES)
        if self._attempts:
            return await self._run_slices(inp, offsets, issued, gate)
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
        return self._snapshot()

    async def _run_slices(
        self, inp: BulkOnboardingInput, offsets: list[int], issued: datetime, gate: asyncio.Semaphore
    ) -> BulkProgress:
        slices = [asyncio.ensure_future(self._slice(inp, o, issued, gate)) for o in offsets]
        cancelled = False
        try:
            await workflow.wait(slices, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            cancelled = True
        failures = [s.exception() for s in slices if s.done() and not s.cancelled()]
        failure = next((f for f in failures if f is not None), None)
        if not cancelled and failure is None:
            self._status = "completed"
            result = self._snapshot()
            result.failures = result.failures[:RESULT_FAILURES]  # all of them: the progress query
            return result
        if failure is not None and not isinstance(failure, ActivityError):
            raise failure  # a bug in this code: the task fails and retries, nothing is undone
        # stop: no slice starts any more, the running ones stop (or finish) before the undo
        self._stopping, self._status = True, "compensating"
        for s in slices:
            s.cancel()
        await run_to_end(asyncio.ensure_future(workflow.wait(slices)))
        for s in slices:  # every outcome is retrieved: the undo below covers them all
            if not s.cancelled():
                s.exception()
        if failure is None:
            await self._undo_all(inp, "bulk onboarding cancelled by an operator", "cancelled")
            raise asyncio.CancelledError
        reason = f"bulk onboarding failed: {failure.cause or failure}"
        await self._undo_all(inp, reason, "failed")
        raise ApplicationError(reason, type="BulkOnboardingFailed", non_retryable=True)

    def _chunk(self, inp: BulkOnboardingInput, offset: int, issued: datetime) -> BulkChunk:
        return BulkChunk(
            tenant=inp.tenant,
            bulk_id=self._owner,
            claim_id=inp.claim_id,
            offset=offset,
            limit=min(inp.chunk_size, inp.total - offset),
            actor=inp.actor.subject,
            issued_at=issued,
            expires_at=issued + CREDENTIAL_LIFETIME,
            lifetime_per_type=workflow.patched(LIFETIME_PATCH),
        )

    async def _slice_by_ref(
        self, inp: BulkOnboardingInput, offset: int, issued: datetime, gate: asyncio.Semaphore
    ) -> None:
        """One slice (EVENTS_BY_REF_PATCH): provisioned in its place, its events recorded after."""
        async with gate:
            if self._stopping:
                return
            now = workflow.now()
            chunk = self._chunk(inp, offset, issued)
            # a stop asks the slice to roll back, and waits until it has
            result = await calls.execute(
                DeviceActivities.provision_batch,
                chunk,
                start_to_close_timeout=timedelta(minutes=2),
                schedule_to_close_timeout=STEP_SCHEDULE_TO_CLOSE,
                retry_policy=STEP_RETRY,
                heartbeat_timeout=PROVISION_HEARTBEAT,
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            )
            self._onboarded.extend(result.onboarded)
            self._failures.extend(result.failed)
        # the next slice provisions meanwhile; a stop waits for this recording like any step
        if self._stopping:
            return  # finished despite the stop: undone with the rest
        if result.onboarded:
            ref = BulkOnboardedEvents(
                tenant=inp.tenant,
                claim_id=inp.claim_id,
                offset=chunk.offset,
                limit=chunk.limit,
                owner=self._owner,
                event_key=self._event_key,
                bulk_id=inp.bulk_id,
                actor=inp.actor.subject,
                source_workflow=workflow.info().workflow_id,
                occurred_at=now,
            )
            try:
                await calls.execute(
                    NotificationActivities.record_bulk_onboarded,
                    ref,
                    start_to_close_timeout=timedelta(minutes=1),
                    schedule_to_close_timeout=STEP_SCHEDULE_TO_CLOSE,
                    retry_policy=STEP_RETRY,
                    cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                )
            except ActivityError as exc:
                if self._stopping:
                    raise  # the whole import is undone
                await self._drop(inp, result.onboarded, exc)
        self._processed += chunk.limit

    async def _slice(
        self, inp: BulkOnboardingInput, offset: int, issued: datetime, gate: asyncio.Semaphore
    ) -> None:
        if self._by_ref:
            await self._slice_by_ref(inp, offset, issued, gate)
            return
        async with gate:
            if self._stopping:
                return
            now = workflow.now()
            chunk = self._chunk(inp, offset, issued)
            if self._attempts:  # a stop asks the slice to roll back, and waits until it has
                result = await calls.execute(
                    DeviceActivities.provision_batch,
                    chunk,
                    start_to_close_timeout=timedelta(minutes=2),
                    schedule_to_close_timeout=STEP_SCHEDULE_TO_CLOSE,
                    retry_policy=STEP_RETRY,
                    heartbeat_timeout=PROVISION_HEARTBEAT,
                    cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                )
            else:
                result = await calls.execute(
                    DeviceActivities.provision_batch,
                    chunk,
                    start_to_close_timeout=timedelta(minutes=2),
                    schedule_to_close_timeout=STEP_SCHEDULE_TO_CLOSE,
                    retry_policy=STEP_RETRY,
                )
            self._onboarded.extend(result.onboarded)
            self._failures.extend(result.failed)
            if self._stopping:
                return  # finished despite the stop: undone with the rest
            if result.onboarded and self._attempts:
                batches = [
                    result.onboarded[i : i + EVENTS_PER_ACTIVITY]
                    for i in range(0, len(result.onboarded), EVENTS_PER_ACTIVITY)
                ]
                if workflow.patched(EVENTS_AT_ONCE_PATCH):
                    await self._record_all(inp, batches, now)
                else:
                    for batch in batches:
                        await self._record_events(inp, batch, now)
            elif result.onboarded:
                await self._record_events(inp, result.onboarded, now)
            self._processed += chunk.limit

    async def _record_all(self, inp: BulkOnboardingInput, batches: list[list[str]], at: datetime) -> None:
        """Record a slice's event batches at once (EVENTS_AT_ONCE_PATCH). Every batch's outcome is
        known before this returns or raises: a stop waits for them all before the undo."""
        outcomes = await asyncio.gather(
            *(self._record_events(inp, batch, at) for batch in batches), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _record_events(self, inp: BulkOnboardingInput, device_ids: list[str], at: datetime) -> None:
        events = [
            DomainEvent(
                event_id=f"{self._event_key}/{device_id}/{DEVICE_ONBOARDED}",
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
        cancellation = (
            ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
            if self._attempts
            else ActivityCancellationType.TRY_CANCEL
        )
        try:
            await calls.execute(
                NotificationActivities.record_events,
                EventBatch(events=events),
                start_to_close_timeout=timedelta(minutes=1),
                schedule_to_close_timeout=STEP_SCHEDULE_TO_CLOSE,
                retry_policy=STEP_RETRY,
                cancellation_type=cancellation,
            )
        except ActivityError as exc:
            if self._stopping:
                raise  # the whole import is undone
            await self._drop(inp, device_ids, exc)

    async def _drop(self, inp: BulkOnboardingInput, device_ids: list[str], exc: ActivityError) -> None:
        """The devices whose events could not be recorded are undone and reported as failed."""
        reason = f"event not recorded: {exc.cause or exc}"
        await self._deprovision(inp, device_ids, reason)
        if self._attempts and workflow.patched(RETRACT_PATCH):  # some may have been recorded
            await self._retract(inp, device_ids)
        gone = set(device_ids)
        self._onboarded = [d for d in self._onboarded if d not in gone]
        cut = reason[:FAILURE_REASON]  # the progress query pages failures of a bounded size
        self._failures.extend(DeviceFailure(index=-1, device_id=d, reason=cut) for d in device_ids)

    async def _deprovision(self, inp: BulkOnboardingInput, device_ids: list[str] | None, reason: str) -> None:
        await calls.execute(
            DeviceActivities.deprovision_batch,
            DeviceBatch(
                tenant=inp.tenant,
                bulk_id=self._owner,
                device_ids=device_ids,
                reason=reason,
                actor=inp.actor.subject,
            ),
            start_to_close_timeout=COMPENSATION_START_TO_CLOSE,
            retry_policy=COMPENSATION_RETRY,
        )

    async def _retract(self, inp: BulkOnboardingInput, device_ids: list[str] | None) -> None:
        """Retract the DeviceOnboarded events this attempt recorded (of device_ids; None: all)."""
        await calls.execute(
            NotificationActivities.retract_events,
            RetractEvents(
                tenant=inp.tenant,
                type=DEVICE_ONBOARDED,
                id_prefix=f"{self._event_key}/",
                device_ids=device_ids,
            ),
            start_to_close_timeout=COMPENSATION_START_TO_CLOSE,
            retry_policy=COMPENSATION_RETRY,
        )

    async def _undo_attempt(self, inp: BulkOnboardingInput, reason: str) -> None:
        await self._deprovision(inp, None, reason)
        if workflow.patched(RETRACT_PATCH):  # subscribers are not told of devices that are undone
            await self._retract(inp, None)

    async def _undo_all(self, inp: BulkOnboardingInput, reason: str, status: str) -> None:
        self._status, self._reason = "compensating", reason
        # None: every device of this import, including a slice cut short mid-flight
        if self._attempts:  # shielded: a further cancel does not leave live credentials behind
            undo = asyncio.ensure_future(self._undo_attempt(inp, reason))
            await run_to_end(undo)
            undo.result()
        else:
            await self._deprovision(inp, None, reason)
        self._onboarded = []
        self._status = status

    @workflow.query
    def progress(self, failures_from: int = 0) -> BulkProgress:
        """Counts so far and the failures from index failures_from on (at most PROGRESS_FAILURES)."""
        result = self._snapshot()
        start = max(failures_from, 0)
        result.failures = result.failures[start : start + PROGRESS_FAILURES]
        return result

    def _snapshot(self) -> BulkProgress:
        inp = self._input
        return BulkProgress(
            bulk_id=inp.bulk_id if inp else "",
            status=self._status,
            total=inp.total if inp else 0,
            processed=self._processed,
            onboarded=len(self._onboarded),
            failed=len(self._failures),
            failures=list(self._failures),
            reason=self._reason,
        )
