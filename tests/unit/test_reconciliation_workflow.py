"""Reconciliation's paging with stub activities (time-skipping server): every device is checked
once, in key order, across continue-as-new (a lowered pages_per_run), the cursor and counts
carried, events recorded only for pages with findings, the totals recorded once at the end."""

from __future__ import annotations

import uuid
from datetime import UTC

from temporalio import activity
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.consistency import (
    ConsistencyEvents,
    FinishReconciliation,
    ReconciledPage,
    ReconcileInput,
    ReconcilePage,
)
from fleetflow.contracts.telemetry import Supervised, SuperviseIngestion
from workflows.reconciliation import Reconciliation

DEVICES = [("acme", f"d{i:02}") for i in range(7)] + [("globex", "d00"), ("globex", "d01")]
FINDING_AT = {("acme", "d03"), ("globex", "d01")}
SEEN: list[tuple[str, str]] = []
EVENT_PAGES: list[tuple[str, str]] = []
FINISHED: list[FinishReconciliation] = []


@activity.defn(name="device.reconcile_devices")
async def reconcile_devices(page: ReconcilePage) -> ReconciledPage:
    after = (page.after_tenant, page.after_device)
    rows = [d for d in DEVICES if d > after][: page.limit]
    SEEN.extend(rows)
    if not rows:
        return ReconciledPage(checked=0)
    found = sum(1 for r in rows if r in FINDING_AT)
    return ReconciledPage(checked=len(rows), findings=found, last_tenant=rows[-1][0], last_device=rows[-1][1])


@activity.defn(name="notification.record_consistency_events")
async def record_events(page: ConsistencyEvents) -> int:
    EVENT_PAGES.append((page.last_tenant, page.last_device))
    return 1


@activity.defn(name="data.supervise_ingestion")
async def supervise(request: SuperviseIngestion) -> Supervised:
    return Supervised(started=0, reclaimed=3)


@activity.defn(name="device.finish_reconciliation")
async def finish(request: FinishReconciliation) -> None:
    FINISHED.append(request)


async def test_every_device_is_checked_once_across_continue_as_new(env: WorkflowEnvironment) -> None:
    SEEN.clear()
    EVENT_PAGES.clear()
    FINISHED.clear()
    workers = [
        Worker(env.client, task_queue=TaskQueue.DEVICE.value, activities=[reconcile_devices, finish]),
        Worker(env.client, task_queue=TaskQueue.NOTIFICATION.value, activities=[record_events]),
        Worker(env.client, task_queue=TaskQueue.DATA.value, activities=[supervise]),
        Worker(env.client, task_queue=TaskQueue.ORCHESTRATION.value, workflows=[Reconciliation]),
    ]
    workflow_id = f"reconcile-test-{uuid.uuid4().hex[:6]}"
    async with workers[0], workers[1], workers[2], workers[3]:
        result = await env.client.execute_workflow(
            Reconciliation.run,
            ReconcileInput(shards=2, page_size=2, pages_per_run=2),
            id=workflow_id,
            task_queue=TaskQueue.ORCHESTRATION.value,
        )
        history = await env.client.get_workflow_handle(workflow_id).fetch_history()
    assert SEEN == sorted(DEVICES)  # each once, in key order, whatever run checked it
    assert result.checked == len(DEVICES) and result.reclaimed == 3 and result.run_id == workflow_id
    assert EVENT_PAGES == [("acme", "d03"), ("globex", "d01")]
    assert len(FINISHED) == 1 and FINISHED[0].checked == len(DEVICES)
    # five pages of two, two a run: the last run was continued, and kept the first run's start
    started = history.events[0]
    assert started.workflow_execution_started_event_attributes.continued_execution_run_id
    assert FINISHED[0].started_at < started.event_time.ToDatetime(tzinfo=UTC)
