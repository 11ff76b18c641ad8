"""DeviceDecommission: retire one device (id `decommission-{tenant}-{device_id}`).

Revoke every credential (access ends at once) → end the twin → cancel pending jobs →
archive or delete telemetry → mark `decommissioned` → record `DeviceDecommissioned`.
Each step is retried; a step that still cannot succeed is written on the device itself
(`status_reason`) and the run fails saying where, so no device is half-retired silently.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.types import MethodAsyncSingleParam

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import DomainEvent, tenant_scoped_id
    from fleetflow.contracts.events import EventBatch
    from fleetflow.contracts.rollouts import (
        DEVICE_DECOMMISSIONED,
        DecommissionInput,
        DecommissionProgress,
        DeviceStep,
    )
    from fleetflow.contracts.twin import EndTwin
    from fleetflow.interfaces.data import DataActivities
    from fleetflow.interfaces.device import DeviceActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from workflows import calls
    from workflows.device_twin import DeviceTwin, twin_id
    from workflows.saga import COMPENSATION_RETRY

# an activity step of the retirement: takes the device, whatever it answers
RetireStep = MethodAsyncSingleParam[Any, DeviceStep, object]

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
        # None: a step of this workflow itself, on its own queue
        steps: list[tuple[str, RetireStep | None]] = [
            ("revoke_credentials", DeviceActivities.revoke_all_credentials),
            ("end_twin", None),
            ("cancel_jobs", DeviceActivities.cancel_jobs),
            ("retire_telemetry", DataActivities.retire_telemetry),
            ("mark_decommissioned", DeviceActivities.mark_decommissioned),
        ]
        for name, activity in steps:
            self._p.current = name
            try:
                if activity is None:
                    await self._end_twin(inp)
                else:
                    await calls.execute(
                        activity,
                        step,
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
        await calls.execute(
            NotificationActivities.record_events,
            EventBatch(events=[event]),
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
        await calls.execute(
            DeviceActivities.note_retirement_problem,
            note,
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=COMPENSATION_RETRY,
        )
        raise ApplicationError(self._p.error, type="DecommissionStuck", non_retryable=True)

    @workflow.query
    def progress(self) -> DecommissionProgress:
        """Steps done, the current one, and the error if it is stuck."""
        return self._p
