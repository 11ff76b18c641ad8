"""`/health` (no auth) and `/v1/services`: the system check and the service graph."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from api.auth import State, require
from fleetflow.contracts.common import Strict, TaskQueue
from fleetflow.contracts.system import SystemCheckRequest, SystemReport
from fleetflow.security import TokenClaims
from fleetflow.system_report import pollers, run_system_check

router = APIRouter(tags=["system"])

# which workflow calls which service queue: the edges of the service dependency graph
WORKFLOW_QUEUES: dict[str, tuple[TaskQueue, ...]] = {
    "SystemCheck": (TaskQueue.DEVICE, TaskQueue.DATA, TaskQueue.ANALYTICS, TaskQueue.NOTIFICATION),
    "DeviceOnboarding": (TaskQueue.DEVICE, TaskQueue.NOTIFICATION),
    "BulkOnboarding": (TaskQueue.DEVICE, TaskQueue.NOTIFICATION),
    "DeviceTwin": (),
    "TelemetryIngestion": (TaskQueue.DEVICE, TaskQueue.DATA, TaskQueue.ANALYTICS, TaskQueue.NOTIFICATION),
    "IngestionSupervisor": (TaskQueue.DATA, TaskQueue.ANALYTICS, TaskQueue.NOTIFICATION),
    "EventDelivery": (TaskQueue.NOTIFICATION,),
    "FirmwareRollout": (TaskQueue.DEVICE, TaskQueue.NOTIFICATION),
    "DeviceDecommission": (TaskQueue.DEVICE, TaskQueue.DATA, TaskQueue.NOTIFICATION),
}


class ServiceNode(Strict):
    """A service (task queue), its pollers, and the workflows that call it."""

    queue: str
    pollers: int
    called_by: list[str]


@router.get("/health", response_model=SystemReport, responses={503: {"model": SystemReport}})
async def health(state: State, timeout: Annotated[float, Query(ge=0.001, le=60)] = 5.0) -> JSONResponse:
    """Run the SystemCheck workflow; 200 when every service answered, 503 otherwise.

    `timeout` is at least 1 ms: a smaller one rounds to a zero activity timeout, which Temporal
    reads as none, so the check's workflow would fail every task until its deadline."""
    report = await run_system_check(state.temporal, SystemCheckRequest(timeout_s=timeout))
    return JSONResponse(report.model_dump(mode="json"), status_code=200 if report.ok else 503)


@router.get("/v1/services", response_model=list[ServiceNode])
async def services(
    state: State, _: Annotated[TokenClaims, Depends(require("system:read"))]
) -> list[ServiceNode]:
    """Every task queue with its pollers and the workflows that depend on it."""
    nodes = []
    for queue in TaskQueue:
        callers = sorted(w for w, queues in WORKFLOW_QUEUES.items() if queue in queues)
        if queue is TaskQueue.ORCHESTRATION:
            callers = []
        count = await pollers(state.temporal, queue.value, workflows=queue is TaskQueue.ORCHESTRATION)
        nodes.append(ServiceNode(queue=queue.value, pollers=count, called_by=callers))
    return nodes
