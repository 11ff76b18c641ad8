"""DeviceDecommission: retire one device (id `decommission-{tenant}-{device_id}`).

Revoke every credential (access ends at once) → end the twin → cancel pending jobs →
archive or delete telemetry → mark `decommissioned` → record `DeviceDecommissioned`.
Each step is retried; a step that still cannot succeed is written on the device itself
(`status_reason`) and the run fails saying where, so no device is half-retired silently.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import DomainEvent, TaskQueue, tenant_scoped_id
    from fleetflow.contracts.events import EventBatch
    from fleetflow.contracts.rollouts import (
        DEVICE_DECOMMISSIONED,
        DecommissionInput,
        DecommissionProgress,
        DeviceStep,
    )
    from fleetflow.contracts.twin import EndTwin
    from workflows.device_twin import DeviceTwin, twin_id
    from workflows.saga import COMPENSATION_RETRY

STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=10,
)


def decommission_id(tenant: str, device_id: str) -> str:
    """The business id of a device's decommissioning."""
    return tenant_scoped_id("decommission", tenant, device_id)


@workflow.defn
class DeviceDecommission:
    """Retires a device; query `progress`."""

    @workflow.init
    def __init__(self, inp: DecommissionInput) -> None:
        self._p = DecommissionProgress(device_id=inp.device_id, status="running", done=[], current=None)

    @workflow.run
    async def run(self, inp: DecommissionInput) -> DecommissionProgress:
        """Run every step in order."""
        step = DeviceStep(
            tenant=inp.tenant,
            device_id=inp.device_id,
            actor=inp.actor.subject,
            telemetry=inp.telemetry,
            reason=inp.reason,
        )
        steps = [
            ("revoke_credentials", "device.revoke_all_credentials", TaskQueue.DEVICE),
            ("end_twin", "", TaskQueue.ORCHESTRATION),
            ("cancel_jobs", "device.cancel_jobs", TaskQueue.DEVICE),
            ("retire_telemetry", "data.retire_telemetry", TaskQueue.DATA),
            ("mark_decommissioned", "device.mark_decommissioned", TaskQueue.DEVICE),
        ]
        for name, activity, queue in steps:
            self._p.current = name
            try:
                if name == "end_twin":
                    await self._end_twin(inp)
                else:
                    await workflow.execute_activity(
                        activity,
                        step,
                        task_queue=queue.value,
                        start_to_close_timeout=timedelta(minutes=2),
                        retry_policy=STEP_RETRY,
                    )
            except ActivityError as exc:
                await self._stuck(step, name, str(exc.cause or exc))
            self._p.done.append(name)
        self._p.current = "record_event"
        event = DomainEvent(
            event_id=f"{workflow.info().workflow_id}/{DEVICE_DECOMMISSIONED}",
            tenant=inp.tenant,
            device_id=inp.device_id,
            type=DEVICE_DECOMMISSIONED,
            occurred_at=workflow.now(),
            actor=inp.actor.subject,
            source_workflow=workflow.info().workflow_id,
            data={"telemetry": inp.telemetry, "reason": inp.reason},
        )
        await workflow.execute_activity(
            "notification.record_events",
            EventBatch(events=[event]),
            task_queue=TaskQueue.NOTIFICATION.value,
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=COMPENSATION_RETRY,
        )
        self._p.done.append("record_event")
        self._p.current, self._p.status = None, "completed"
        return self._p

    async def _end_twin(self, inp: DecommissionInput) -> None:
        twin = workflow.get_external_workflow_handle(twin_id(inp.tenant, inp.device_id))
        try:
            await twin.signal(DeviceTwin.end, EndTwin(reason="decommissioned", actor=inp.actor.subject))
        except ApplicationError:
            pass  # no running twin: nothing to end

    async def _stuck(self, step: DeviceStep, name: str, error: str) -> None:
        self._p.status, self._p.error = "stuck", f"{name} failed: {error}"
        note = step.model_copy(update={"reason": f"decommissioning stuck at {name}: {error}"[:500]})
        await workflow.execute_activity(
            "device.note_retirement_problem",
            note,
            task_queue=TaskQueue.DEVICE.value,
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=COMPENSATION_RETRY,
        )
        raise ApplicationError(self._p.error, type="DecommissionStuck", non_retryable=True)

    @workflow.query
    def progress(self) -> DecommissionProgress:
        """Steps done, the current one, and the error if it is stuck."""
        return self._p
