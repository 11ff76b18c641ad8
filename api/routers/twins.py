"""Device twins: desired/reported state, the device's long-poll, history and time travel."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Response, status
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.notifications import NotificationService
from api.auth import State, actor_of, require, require_device
from api.problems import conflict, invalid, not_found
from api.state import AppState
from api.time_travel import HistoryEntry, NoTwinThen, device_history, twin_as_of
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.devices import DeviceStatus
from fleetflow.contracts.twin import (
    DeltaView,
    DesiredSet,
    ReportedBody,
    ReportState,
    SetDesired,
    TwinInput,
    TwinState,
    TwinView,
)
from fleetflow.security import DeviceClaims, TokenClaims
from fleetflow.temporal import device_search_attributes
from fleetflow.twin_state import delta, view
from workflows.device_twin import DeviceTwin, twin_id

router = APIRouter(tags=["twins"])
FLEET_EVENTS = {
    "FirmwareUpdated",
    "FirmwareUpdateFailed",
    "FirmwareRolledBack",
    "AlertRaised",
    "AlertCleared",
}
Reader = Annotated[TokenClaims, Depends(require("devices:read"))]
Writer = Annotated[TokenClaims, Depends(require("devices:write"))]
Device = Annotated[tuple[DeviceClaims, str], Depends(require_device)]
T = TypeVar("T")

MAX_WAIT_S = 60
POLL_S = 0.2


async def _start_twin(state: AppState, tenant: str, device_id: str) -> None:
    """Start the twin of an active device that has none yet (bulk-onboarded devices)."""
    device = await state.devices.get_device(tenant, device_id)
    if device is None:
        raise not_found(f"device {device_id!r}")
    if device.status != DeviceStatus.ACTIVE:
        raise conflict(f"device {device_id!r} is {device.status.value}: it has no twin")
    kind = await state.devices.device_type(tenant, device.device_type)
    config = await state.devices.config_of(tenant, device_id) or {}
    await state.temporal.start_workflow(
        DeviceTwin.run,
        TwinInput(tenant=tenant, device_id=device_id, config_schema=kind.config_schema if kind else {},
                  initial_desired=config, initial_reported={"firmware_version": device.firmware_version}),
        id=twin_id(tenant, device_id), task_queue=TaskQueue.ORCHESTRATION.value,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=device_search_attributes(tenant, "twin", device_id),
    )  # fmt: skip


async def _on_twin(
    state: AppState,
    tenant: str,
    device_id: str,
    action: Callable[[WorkflowHandle[Any, Any]], Awaitable[T]],
) -> T:
    """Run action on the device's twin, starting the twin first if the device has none."""
    handle = state.temporal.get_workflow_handle(twin_id(tenant, device_id))
    try:
        return await action(handle)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
    await _start_twin(state, tenant, device_id)
    return await action(handle)


async def _twin_state(state: AppState, tenant: str, device_id: str) -> TwinState:
    async def get(handle: WorkflowHandle[Any, Any]) -> TwinState:
        result: TwinState = await handle.query(DeviceTwin.get)
        return result

    return await _on_twin(state, tenant, device_id, get)


_EVENT_REF = re.compile(r"^(?:(?P<run>[0-9a-f-]{36}):)?(?P<event>\d+)$")


@router.get("/v1/devices/{device_id}/twin", response_model=TwinView)
async def get_twin(
    device_id: str,
    state: State,
    claims: Reader,
    response: Response,
    as_of: Annotated[
        str | None, Query(description="RFC 3339 time, event id (latest run), or run_id:event_id")
    ] = None,
) -> TwinView:
    """Desired, reported, delta and versions; `as_of` rebuilds a past state by replay."""
    if as_of is None:
        current = await _twin_state(state, claims.tenant, device_id)
        response.headers["ETag"] = f'"{current.desired_version}"'
        return view(current, datetime.now(UTC))
    if await state.devices.get_device(claims.tenant, device_id) is None:
        raise not_found(f"device {device_id!r}")
    wid = twin_id(claims.tenant, device_id)
    ref = _EVENT_REF.match(as_of)
    try:
        if ref:
            past, run_id, at = await twin_as_of(
                state.temporal, claims.tenant, wid, run_id=ref["run"], event_id=int(ref["event"])
            )
        else:
            try:
                when = datetime.fromisoformat(as_of.replace("Z", "+00:00"))
            except ValueError:
                raise invalid(["query", "as_of"], "must be an RFC 3339 time or an event id") from None
            if when.tzinfo is None:
                raise invalid(["query", "as_of"], "needs a time zone (e.g. Z)")
            past, run_id, _ = await twin_as_of(state.temporal, claims.tenant, wid, at=when)
            at = when
    except NoTwinThen as exc:
        raise not_found(str(exc)) from None
    return view(past, at, as_of=at, run_id=run_id)


def _version(if_match: str | None) -> int | None:
    if if_match is None or if_match.strip() == "*":
        return None
    text = if_match.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise invalid(["header", "If-Match"], 'must be the desired version, e.g. "3"')
    return int(text)


@router.patch("/v1/devices/{device_id}/twin/desired", response_model=DesiredSet)
async def set_desired(
    device_id: str,
    patch: Annotated[dict[str, Any], Body(description="JSON merge patch of the desired document")],
    state: State,
    claims: Writer,
    response: Response,
    if_match: Annotated[str | None, Header()] = None,
) -> DesiredSet:
    """Change desired state (a Temporal update); 412 when If-Match names a stale version."""
    request = SetDesired(actor=actor_of(claims), patch=patch, expected_version=_version(if_match))

    async def update(handle: WorkflowHandle[Any, Any]) -> DesiredSet:
        result: DesiredSet = await handle.execute_update(DeviceTwin.set_desired, request)
        return result

    try:
        result = await _on_twin(state, claims.tenant, device_id, update)
    except WorkflowUpdateFailedError as exc:
        raise _refusal(exc) from None
    response.headers["ETag"] = f'"{result.version}"'
    return result


def _refusal(exc: WorkflowUpdateFailedError) -> HTTPException:
    cause = exc.cause
    if not isinstance(cause, ApplicationError):
        return conflict(str(cause or exc))
    if cause.type == "StaleVersion":
        return HTTPException(status.HTTP_412_PRECONDITION_FAILED, detail=cause.message)
    if cause.type == "InvalidDocument":
        path = str(cause.details[0]) if cause.details else "desired"
        reason = str(cause.details[1]) if len(cause.details) > 1 else cause.message
        return invalid(["body", *path.split(".")[1:]], reason)
    if cause.type == "Forbidden":
        return HTTPException(status.HTTP_403_FORBIDDEN, detail=cause.message)
    return conflict(cause.message)


@router.post("/v1/device/twin/reported", status_code=status.HTTP_202_ACCEPTED, response_model=DeltaView)
async def report(body: ReportedBody, state: State, device: Device) -> DeltaView:
    """The device reports what it applied; answers with what is still to do."""
    claims, _ = device
    signal = ReportState(patch=body.reported, at=datetime.now(UTC))

    async def send(handle: WorkflowHandle[Any, Any]) -> TwinState:
        await handle.signal(DeviceTwin.report, signal)
        result: TwinState = await handle.query(DeviceTwin.get)
        return result

    current = await _on_twin(state, claims.tenant, claims.device_id, send)
    return DeltaView(delta=delta(current.desired, current.reported), desired_version=current.desired_version)


@router.get("/v1/device/twin/delta", response_model=DeltaView)
async def wait_for_delta(
    state: State,
    device: Device,
    wait: Annotated[int, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for a delta")] = 0,
) -> DeltaView:
    """What the device must still apply; with `wait`, holds the request until there is some."""
    claims, _ = device
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        current = await _twin_state(state, claims.tenant, claims.device_id)
        pending = delta(current.desired, current.reported)
        if pending or asyncio.get_running_loop().time() >= deadline:
            return DeltaView(delta=pending, desired_version=current.desired_version)
        await asyncio.sleep(POLL_S)


@router.get("/v1/devices/{device_id}/history", response_model=list[HistoryEntry])
async def history(device_id: str, state: State, claims: Reader) -> list[HistoryEntry]:
    """The device's domain events in order, read from all its workflows' Temporal histories."""
    if await state.devices.get_device(claims.tenant, device_id) is None:
        raise not_found(f"device {device_id!r}")
    entries = await device_history(state.temporal, claims.tenant, device_id)
    # campaigns and analytics span many devices, so their runs carry no DeviceId: their
    # per-device facts come from the event store
    stored = await NotificationService(state.pool).list_events(claims.tenant, device_id=device_id, limit=1000)
    entries.extend(
        HistoryEntry(
            time=e.occurred_at,
            type=e.type,
            actor=e.actor,
            workflow_type="",
            workflow_id=e.source_workflow or "",
            run_id="",
            event_id=e.seq,
        )
        for e in stored
        if e.type in FLEET_EVENTS
    )
    entries.sort(key=lambda e: e.time)
    return entries
