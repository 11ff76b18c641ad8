"""Proof that a run without a service token was started by one of fleetflow's schedules (see
fleetflow.schedules): the schedule's own description must list the run among those it started,
its action must be the one SCHEDULES defines, and the run's own input (its history's first
event) must be the defined one: a holder of Temporal access may update a schedule's action,
trigger it and put the action back before the proof looks, so the action read now says
nothing about what the run was started with."""

from __future__ import annotations

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, ScheduleActionExecutionStartWorkflow, ScheduleActionStartWorkflow
from temporalio.exceptions import ApplicationError

from fleetflow.contracts.retention import ScheduledRun, ScheduledRunVerdict
from fleetflow.schedules import definition

NOT_YET = "ScheduleNotRecordedYet"


async def verify_scheduled_run(client: Client | None, run: ScheduledRun) -> ScheduledRunVerdict:
    """Accepted when the schedule recorded starting this run; a retryable error while it has
    not recorded it yet (the run's first task can beat the schedule's bookkeeping)."""
    defined = definition(run.schedule_id)
    if defined is None:
        return ScheduledRunVerdict(accepted=False, reason=f"{run.schedule_id!r} is not a fleetflow schedule")
    if defined.workflow != run.workflow_type:
        return ScheduledRunVerdict(
            accepted=False, reason=f"schedule {run.schedule_id!r} does not run {run.workflow_type}"
        )
    if client is None:
        return ScheduledRunVerdict(accepted=False, reason="this worker has no Temporal client")
    described = await client.get_schedule_handle(run.schedule_id).describe()
    action = described.schedule.action
    if not isinstance(action, ScheduleActionStartWorkflow) or action.workflow != defined.workflow:
        return ScheduledRunVerdict(accepted=False, reason="the schedule's action is not the defined one")
    if not run.workflow_id.startswith(f"{action.id}-"):
        return ScheduledRunVerdict(accepted=False, reason="the run's id is not one the schedule makes")
    expected = defined.input()
    try:
        args = await client.data_converter.decode(list(action.args), [type(expected)])
    except Exception:  # not our payload (another codec key, another type): not the defined input
        args = []
    if len(args) != 1 or args[0] != expected:
        return ScheduledRunVerdict(accepted=False, reason="the schedule's input is not the defined one")
    actions = [*described.info.running_actions, *(r.action for r in described.info.recent_actions)]
    started = {
        (a.workflow_id, a.first_execution_run_id)
        for a in actions
        if isinstance(a, ScheduleActionExecutionStartWorkflow)
    }
    if (run.workflow_id, run.run_id) not in started:
        if any(workflow_id == run.workflow_id for workflow_id, _ in started):
            # the schedule started this id as another run: this one reuses it, and never will be
            return ScheduledRunVerdict(
                accepted=False, reason="the schedule recorded another run under this workflow id"
            )
        raise ApplicationError(
            f"schedule {run.schedule_id!r} has not recorded run {run.run_id}", type=NOT_YET
        )
    if not await _started_with(client, run, expected):
        return ScheduledRunVerdict(accepted=False, reason="the run's input is not the defined one")
    return ScheduledRunVerdict(accepted=True)


async def _started_with(client: Client, run: ScheduledRun, expected: object) -> bool:
    """Whether the run's history starts with exactly `expected` as its input."""
    handle = client.get_workflow_handle(run.workflow_id, run_id=run.run_id)
    async for event in handle.fetch_history_events():
        if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            return False
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        try:
            args = await client.data_converter.decode(list(payloads), [type(expected)])
        except Exception:  # not our payload: not the defined input
            return False
        return len(args) == 1 and args[0] == expected
    return False
