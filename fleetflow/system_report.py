"""Run the SystemCheck workflow and combine it with what Temporal says of each queue."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue as TaskQueueRef
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle

from fleetflow.contracts.common import SERVICE_QUEUES, TaskQueue
from fleetflow.contracts.system import (
    ServiceProbe,
    ServiceStatus,
    SystemCheckRequest,
    SystemCheckResult,
    SystemReport,
)


async def pollers(client: Client, queue: str, *, workflows: bool = False) -> int:
    """How many workers poll queue (activity pollers, or workflow pollers)."""
    kind = TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW if workflows else TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueueRef(name=queue), task_queue_type=kind
        )
    )
    return len(response.pollers)


async def _pollers_or_none(client: Client, queue: TaskQueue) -> int | None:
    try:
        return await pollers(client, queue.value, workflows=queue is TaskQueue.ORCHESTRATION)
    except Exception:  # reported as unknown, the check goes on
        return None


PICKUP_S = 3.0


async def _picked_up(handle: WorkflowHandle[Any, SystemCheckResult], within_s: float) -> bool:
    """True once a worker has started the workflow's first task (its history grows past 2)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        description = await handle.describe()
        if description.raw_description.workflow_execution_info.history_length > 2:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)


class CheckNotRun(Exception):
    """A worker took the check but failed its workflow task (it would retry until the deadline)."""


async def _task_failure(client: Client, handle: WorkflowHandle[Any, Any]) -> str | None:
    """Why a worker failed the run's workflow task, if one did."""
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            failure = event.workflow_task_failed_event_attributes.failure
            try:
                error = await client.data_converter.decode_failure(failure)
            except ValueError:  # sealed with a payload key this process lacks: so were our payloads
                return (
                    "the workers cannot read this process's payloads and answer with a payload key "
                    "it does not have: run it with the platform's keys (FLEETFLOW_KEYS_DIR, "
                    "FLEETFLOW_PAYLOAD_KEYS)"
                )
            return f"a worker failed the check's workflow task: {error}"
    return None


async def _result(
    client: Client, handle: WorkflowHandle[Any, SystemCheckResult], timeout_s: float
) -> SystemCheckResult:
    """The check's result; CheckNotRun as soon as a worker fails its workflow task."""
    waiter = asyncio.ensure_future(handle.result(rpc_timeout=timedelta(seconds=timeout_s)))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.5)
            if done:
                return waiter.result()
            reason = await _task_failure(client, handle)
            if reason is not None:
                await handle.terminate(reason[:200])
                raise CheckNotRun(reason)
    finally:
        waiter.cancel()


async def run_system_check(client: Client, request: SystemCheckRequest | None = None) -> SystemReport:
    """Probe every service through Temporal; a missing service is named, never waited for."""
    request = request or SystemCheckRequest()
    checked_at = datetime.now(UTC)
    try:
        await asyncio.wait_for(client.service_client.check_health(), 3)
        temporal_error = None
    except Exception as exc:  # any failure is the answer
        temporal_error = f"{type(exc).__name__}: {exc}"
    # a worker that has just started may not have polled yet: give it a moment
    grace_until = asyncio.get_running_loop().time() + min(request.timeout_s, 3.0)
    orchestrators = await _pollers_or_none(client, TaskQueue.ORCHESTRATION)
    while orchestrators == 0 and asyncio.get_running_loop().time() < grace_until:
        await asyncio.sleep(0.25)
        orchestrators = await _pollers_or_none(client, TaskQueue.ORCHESTRATION)

    orchestration = ServiceProbe(service=TaskQueue.ORCHESTRATION.value, answered=False)
    probes = [ServiceProbe(service=q.value, answered=False, error="not checked") for q in SERVICE_QUEUES]
    if orchestrators == 0:
        orchestration.error = "no worker polls the orchestration queue"
        for probe in probes:
            probe.error = "not checked: no orchestration worker to run the check"
    elif temporal_error is None:
        started = asyncio.get_running_loop().time()
        try:
            handle = await client.start_workflow(
                "SystemCheck",
                request,
                id=f"system-check-{uuid.uuid4()}",
                task_queue=TaskQueue.ORCHESTRATION.value,
                result_type=SystemCheckResult,
                execution_timeout=timedelta(seconds=request.timeout_s + 5),
            )
            if await _picked_up(handle, within_s=min(request.timeout_s, PICKUP_S)):
                result = await _result(client, handle, request.timeout_s + 10)
                probes = result.services
                latency = (asyncio.get_running_loop().time() - started) * 1000
                orchestration = ServiceProbe(
                    service=TaskQueue.ORCHESTRATION.value, answered=True, latency_ms=round(latency, 1)
                )
            else:
                await handle.terminate("no orchestration worker picked up the check")
                orchestration.error = (
                    f"no answer: no orchestration worker took the check within {PICKUP_S:g} s"
                )
        except Exception as exc:  # reported, never raised: the report is the answer
            root: BaseException = exc
            while root.__cause__ is not None:  # a failed workflow's reason is in its cause
                root = root.__cause__
            cause = str(root) if isinstance(root, CheckNotRun) else f"{type(root).__name__}: {root}"
            orchestration.error = f"no answer: {cause}"
        if not orchestration.answered:
            for probe in probes:
                probe.error = "not checked: the orchestration worker did not run the check"
    # counted after the probes, so workers that just answered are sure to show
    queues = (TaskQueue.ORCHESTRATION, *SERVICE_QUEUES)
    counts = await asyncio.gather(*(_pollers_or_none(client, q) for q in queues))
    by_queue = dict(zip(queues, counts, strict=True))
    services = [
        ServiceStatus(**p.model_dump(), pollers=by_queue[TaskQueue(p.service)])
        for p in (orchestration, *probes)
    ]
    database_ok = all(s.database_ok for s in services if s.database_ok is not None) and any(
        s.database_ok is not None for s in services
    )
    ok = temporal_error is None and all(s.answered and s.database_ok is not False for s in services)
    return SystemReport(
        ok=ok,
        checked_at=checked_at,
        temporal_ok=temporal_error is None,
        temporal_error=temporal_error,
        database_ok=database_ok,
        services=services,
    )
