"""Periodic work as Temporal Schedules (the Web UI's Schedules page), defined in one list.

Add an entry to SCHEDULES to run a workflow periodically; `fleetflow up` (the API at start-up)
and `fleetflow schedules apply` create or update every entry idempotently, `fleetflow
schedules` lists them with their last and next run.

How a scheduled run gets past service identity. Workers refuse a workflow start without a
short-lived token bound to its workflow id and operation (fleetflow.identity), and a run a
Schedule starts carries only what the schedule's action holds, with an id the server makes
(`<action id>-<time>`). Instead of storing a long-lived token in the action's headers (a
credential readable by whoever can describe the schedule, that must be renewed by runs that
stop when the schedule is paused, and could not be bound to the run's id), a start without a
valid token is accepted only when all of this holds, checked before the workflow's own code:

- its workflow type is in SCHEDULABLE (an entry of SCHEDULES); any other type is refused as
  before;
- it carries the `TemporalScheduledById` search attribute, naming a schedule of SCHEDULES
  whose workflow is this one;
- `data.verify_scheduled_run` (an activity: it needs the network) describes that schedule and
  finds this exact workflow id and run id among the runs the schedule itself recorded starting,
  the schedule's action starts this type with the input SCHEDULES defines, and the run's own
  history starts with that input (the action may have been changed for one trigger and put
  back before the proof reads it).

So a forged search attribute is worthless (the schedule never recorded the run), and the worst
a holder of raw Temporal access could do through a schedule is run a listed workflow with its
listed input at another time (the same holder can already terminate any workflow).
The verified run then acts as `schedule:<id>` and signs its activities like any workflow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowExecutionStatus,
)
from temporalio.common import SearchAttributeKey

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.consistency import RECONCILIATION_WORKFLOW, ReconcileInput
from fleetflow.contracts.retention import RETENTION_ID, RetentionRequest
from fleetflow.settings import load_settings

# set by the server on every run a schedule starts
SCHEDULED_BY = SearchAttributeKey.for_keyword("TemporalScheduledById")


@dataclass(frozen=True)
class ScheduleDefinition:
    """One periodic workflow: schedule id (also the action's workflow id prefix), workflow type,
    its input, and how often."""

    id: str
    workflow: str
    input: Callable[[], BaseModel]
    every: timedelta
    offset: timedelta = timedelta(0)
    description: str = ""
    overlap: ScheduleOverlapPolicy = field(default=ScheduleOverlapPolicy.SKIP)
    timeout: timedelta | None = None  # the whole run, continued-as-new parts included (4 periods)

    def spec(self) -> ScheduleSpec:
        """The schedule's spec."""
        return ScheduleSpec(intervals=[ScheduleIntervalSpec(every=self.every, offset=self.offset)])

    def schedule(self) -> Schedule:
        """The Temporal schedule of this definition."""
        return Schedule(
            action=ScheduleActionStartWorkflow(
                self.workflow,
                self.input(),
                id=self.id,
                task_queue=TaskQueue.ORCHESTRATION.value,
                execution_timeout=self.timeout or self.every * 4,
            ),
            spec=self.spec(),
            policy=SchedulePolicy(overlap=self.overlap),
        )


SCHEDULES: tuple[ScheduleDefinition, ...] = (
    ScheduleDefinition(
        id=RETENTION_ID,
        workflow="Retention",
        input=RetentionRequest,
        every=timedelta(hours=1),
        description="drop readings past each tenant's retention; age out rollups, batches, events",
    ),
    ScheduleDefinition(
        id="reconciliation",
        workflow=RECONCILIATION_WORKFLOW,
        # the shard count comes from the environment every process shares, so the worker that
        # verifies a scheduled run computes the same input as the process that applied it
        input=lambda: ReconcileInput(shards=load_settings().ingest_shards),
        every=timedelta(minutes=15),
        timeout=timedelta(hours=12),  # a large fleet takes longer than a period (SKIP holds the next)
        description="compare registry, twins, credentials and claims; repair what is safe, report the rest",
    ),
)
SCHEDULABLE: frozenset[str] = frozenset(d.workflow for d in SCHEDULES)


def definition(schedule_id: str) -> ScheduleDefinition | None:
    """The entry of SCHEDULES with that id."""
    return next((d for d in SCHEDULES if d.id == schedule_id), None)


async def apply_schedules(client: Client, schedules: Sequence[ScheduleDefinition] = SCHEDULES) -> list[str]:
    """Create each schedule, or bring an existing one to its definition (spec, action, policy;
    its paused state and history are kept). Idempotent; returns what it did per id."""
    done: list[str] = []
    for d in schedules:
        try:
            await client.create_schedule(d.id, d.schedule())
            done.append(f"{d.id}: created")
            continue
        except ScheduleAlreadyRunningError:
            pass

        def updated(input: ScheduleUpdateInput, d: ScheduleDefinition = d) -> ScheduleUpdate:
            new = d.schedule()
            new.state = input.description.schedule.state  # an operator's pause stays
            return ScheduleUpdate(schedule=new)

        await client.get_schedule_handle(d.id).update(updated)
        done.append(f"{d.id}: updated")
    return done


@dataclass(frozen=True)
class ScheduleRow:
    """One line of `fleetflow schedules`."""

    id: str
    workflow: str
    spec: str
    paused: bool
    last_run_at: datetime | None
    last_result: str | None
    next_run_at: datetime | None


def _spec_text(spec: ScheduleSpec) -> str:
    parts = [f"every {i.every}" + (f" +{i.offset}" if i.offset else "") for i in spec.intervals]
    parts += list(spec.cron_expressions)
    return ", ".join(parts) or "-"


async def list_schedules(
    client: Client, schedules: Sequence[ScheduleDefinition] = SCHEDULES
) -> list[ScheduleRow]:
    """Each defined schedule as the server has it: spec, last run (time and how it ended), next
    run. A schedule not applied yet shows as `missing`."""
    rows: list[ScheduleRow] = []
    for d in schedules:
        try:
            described = await client.get_schedule_handle(d.id).describe()
        except Exception:  # not applied yet (or the server away): say so, list the rest
            rows.append(ScheduleRow(d.id, d.workflow, "missing", False, None, None, None))
            continue
        recent = described.info.recent_actions
        last_at, last_result = None, None
        if recent:
            last = recent[-1]
            last_at = last.started_at
            last_result = await _result_of(client, last.action)
        nxt = described.info.next_action_times
        rows.append(
            ScheduleRow(
                id=d.id,
                workflow=d.workflow,
                spec=_spec_text(described.schedule.spec),
                paused=described.schedule.state.paused,
                last_run_at=last_at,
                last_result=last_result,
                next_run_at=nxt[0] if nxt else None,
            )
        )
    return rows


async def _result_of(client: Client, action: Any) -> str:
    workflow_id = getattr(action, "workflow_id", None)
    if not workflow_id:
        return "unknown"
    try:
        described = await client.get_workflow_handle(workflow_id).describe()
    except Exception:
        return "unknown"
    status = described.status
    return status.name.lower() if isinstance(status, WorkflowExecutionStatus) else "unknown"
