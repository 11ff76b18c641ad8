"""Schedules on the real servers: applied idempotently and listed; a run the schedule starts is
accepted without a token, while an ordinary start without one (even one claiming a schedule
through the search attribute) is still refused."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import (
    Client,
    ScheduleActionExecutionStartWorkflow,
    ScheduleOverlapPolicy,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError

from activities.scheduled_runs import verify_scheduled_run
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.retention import RETENTION_ID, RetentionRequest, ScheduledRun
from fleetflow.schedules import SCHEDULED_BY, SCHEDULES, apply_schedules, definition, list_schedules
from tests.support import TEST_KEYS, eventually
from workflows.retention import Retention


def unsigned(client: Client) -> Client:
    """The same server and converter, without the identity interceptor: starts carry no token."""
    config = client.config()
    config["interceptors"] = []
    return Client(**config)


async def test_schedules_are_applied_idempotently_and_a_scheduled_run_is_accepted(
    client: Client, workers: None
) -> None:
    TEST_KEYS.signing_key()  # the session's first key is made here, not inside a workflow
    assert await apply_schedules(client) in (
        [f"{d.id}: created" for d in SCHEDULES],
        [f"{d.id}: updated" for d in SCHEDULES],
    )
    assert await apply_schedules(client) == [f"{d.id}: updated" for d in SCHEDULES]
    listed = {r.id: r for r in await list_schedules(client)}
    assert set(listed) == {d.id for d in SCHEDULES}
    assert listed[RETENTION_ID].spec == "every 1:00:00" and listed[RETENTION_ID].next_run_at is not None

    for schedule in SCHEDULES:  # every listed workflow runs when its schedule starts it
        handle = client.get_schedule_handle(schedule.id)
        before = len((await handle.describe()).info.recent_actions)
        # a run the schedule itself started may still be going: SKIP would drop this trigger
        await handle.trigger(overlap=ScheduleOverlapPolicy.ALLOW_ALL)

        async def last_run() -> tuple[str, WorkflowExecutionStatus | None, bool]:
            recent = (await handle.describe()).info.recent_actions  # noqa: B023
            if len(recent) <= before:  # noqa: B023
                return "", None, False
            workflow_id = getattr(recent[-1].action, "workflow_id", "")
            run = client.get_workflow_handle(workflow_id)
            return workflow_id, (await run.describe()).status, await _under_way(run)

        try:
            workflow_id, status, working = await eventually(
                last_run, lambda r: r[1] not in (None, WorkflowExecutionStatus.RUNNING), timeout_s=60
            )
        except AssertionError:
            # a reconciliation over the 10,000s of devices the session leaves takes minutes:
            # then past its identity check and working is enough (a refused run fails at once)
            workflow_id, status, working = await last_run()
        assert workflow_id.startswith(f"{schedule.id}-")
        if status == WorkflowExecutionStatus.RUNNING:
            assert working, schedule.id
            continue
        assert status == WorkflowExecutionStatus.COMPLETED, schedule.id
        row = {r.id: r for r in await list_schedules(client)}[schedule.id]
        assert row.last_run_at is not None and row.last_result == "completed"


async def _under_way(run: WorkflowHandle[Any, Any]) -> bool:
    """The run has completed an activity, or continued as new from a run that did."""
    async for event in run.fetch_history_events():
        if event.HasField("activity_task_completed_event_attributes"):
            return True
        if event.HasField("workflow_execution_started_event_attributes"):
            if event.workflow_execution_started_event_attributes.continued_execution_run_id:
                return True
    return False


async def test_an_unsigned_start_is_refused_even_claiming_a_schedule(client: Client, workers: None) -> None:
    raw = unsigned(client)
    with pytest.raises(WorkflowFailureError) as refused:
        await raw.execute_workflow(
            Retention.run,
            RetentionRequest(),
            id=f"retention-unsigned-{uuid.uuid4().hex[:8]}",
            task_queue=TaskQueue.ORCHESTRATION.value,
        )
    assert "service identity refused" in str(refused.value.cause)

    # naming the schedule in the search attribute proves nothing: the schedule never started it
    forged = f"{RETENTION_ID}-forged-{uuid.uuid4().hex[:8]}"
    try:
        handle = await raw.start_workflow(
            Retention.run,
            RetentionRequest(),
            id=forged,
            task_queue=TaskQueue.ORCHESTRATION.value,
            search_attributes=TypedSearchAttributes([SearchAttributePair(SCHEDULED_BY, RETENTION_ID)]),
        )
    except RPCError:
        return  # the server itself refuses a client-set TemporalScheduledById
    with pytest.raises(WorkflowFailureError) as forged_refused:
        await handle.result()
    assert "service identity refused" in str(forged_refused.value.cause)


async def test_a_run_triggered_with_another_input_is_not_proved_after_the_action_is_put_back(
    client: Client, workers: None
) -> None:
    """A holder of Temporal access updates the schedule's action (here a harmless `now`; a far
    future one would delete every tenant's data), triggers it and restores the action before
    the proof reads it: the run was recorded by the schedule, but its own input is not the
    defined one, so it is not accepted as the schedule's."""
    TEST_KEYS.signing_key()
    defined = definition(RETENTION_ID)
    assert defined is not None
    harmless = dataclasses.replace(
        defined, input=lambda: RetentionRequest(now=datetime(2000, 1, 1, tzinfo=UTC))
    )
    await apply_schedules(client, [harmless])
    handle = client.get_schedule_handle(RETENTION_ID)
    try:
        before = {a.action.workflow_id for a in (await handle.describe()).info.recent_actions}  # type: ignore[attr-defined]
        await handle.trigger(overlap=ScheduleOverlapPolicy.ALLOW_ALL)

        async def new_action() -> list[ScheduleActionExecutionStartWorkflow]:
            actions = [a.action for a in (await handle.describe()).info.recent_actions]
            return [
                a
                for a in actions
                if isinstance(a, ScheduleActionExecutionStartWorkflow) and a.workflow_id not in before
            ]

        started = (await eventually(new_action, bool, timeout_s=60))[0]
    finally:
        await apply_schedules(client)  # the action back as defined
    run = ScheduledRun(
        schedule_id=RETENTION_ID,
        workflow_id=started.workflow_id,
        run_id=started.first_execution_run_id,
        workflow_type="Retention",
    )
    verdict = await verify_scheduled_run(client, run)
    assert not verdict.accepted and "input" in verdict.reason

    # a run reusing the id the schedule recorded (another run id) is refused at once, not
    # retried as "not recorded yet" until the proof times out
    reused = run.model_copy(update={"run_id": str(uuid.uuid4())})
    verdict = await verify_scheduled_run(client, reused)
    assert not verdict.accepted and "another run" in verdict.reason
