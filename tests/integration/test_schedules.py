"""Schedules on the real servers: applied idempotently and listed; a run the schedule starts is
accepted without a token, while an ordinary start without one (even one claiming a schedule
through the search attribute) is still refused."""

from __future__ import annotations

import uuid

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.retention import RETENTION_ID, RetentionRequest
from fleetflow.schedules import SCHEDULED_BY, SCHEDULES, apply_schedules, list_schedules
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
        await handle.trigger()

        async def last_run() -> tuple[str, WorkflowExecutionStatus | None]:
            recent = (await handle.describe()).info.recent_actions  # noqa: B023
            if len(recent) <= before:  # noqa: B023
                return "", None
            workflow_id = getattr(recent[-1].action, "workflow_id", "")
            return workflow_id, (await client.get_workflow_handle(workflow_id).describe()).status

        workflow_id, status = await eventually(
            last_run, lambda r: r[1] not in (None, WorkflowExecutionStatus.RUNNING), timeout_s=60
        )
        assert workflow_id.startswith(f"{schedule.id}-")
        assert status == WorkflowExecutionStatus.COMPLETED, schedule.id
        row = {r.id: r for r in await list_schedules(client)}[schedule.id]
        assert row.last_run_at is not None and row.last_result == "completed"


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
