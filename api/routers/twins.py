"""Device twins: desired/reported state, the device's long-poll, history and time travel."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from pydantic import ValidationError
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from activities.device_mqtt import notify_twin_changed
from activities.notifications import NotificationService
from api.auth import State, actor_of, require, require_device
from api.models.twins import ReportedBody
from api.mqtt_presence import with_presence
from api.openapi import body_schema
from api.problems import invalid, not_found
from api.time_travel import HistoryEntry, NoTwinThen, device_history, twin_as_of
from api.twin_calls import on_twin, refusal, twin_state
from api.twin_documents import document, json_body, limit_problem
from api.twin_long_poll import MAX_WAIT_S, long_poll
from fleetflow.contracts.twin import (
    DeltaView,
    DesiredSet,
    ReportState,
    SetDesired,
    TwinState,
    TwinView,
)
from fleetflow.security import DeviceClaims, TokenClaims
from fleetflow.twin_state import change_breach, delta, document_breach, merge_patch, view
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

# an event id is an int64: more digits are no event id (and int() refuses thousands of them)
_EVENT_REF = re.compile(r"^(?:(?P<run>[0-9a-f-]{36}):)?(?P<event>\d{1,18})$")


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
        current = await twin_state(state, claims.tenant, device_id)
        response.headers["ETag"] = f'"{current.desired_version}"'
        return await with_presence(state.pool, claims.tenant, view(current, datetime.now(UTC)))
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


_DOCUMENT_BODY = {"type": "object", "description": "a JSON object (twin document limits apply)"}


@router.patch(
    "/v1/devices/{device_id}/twin/desired",
    response_model=DesiredSet,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": {**_DOCUMENT_BODY, "description": "JSON merge patch of the desired document"}
                }
            },
            "required": True,
        }
    },
)
async def set_desired(
    device_id: str,
    request_: Request,
    state: State,
    claims: Writer,
    response: Response,
    if_match: Annotated[str | None, Header()] = None,
) -> DesiredSet:
    """Change desired state (a Temporal update); 412 when If-Match names a stale version.

    Limits: the patch and the resulting desired document at most 64 KiB of JSON, 10 levels deep
    and 1,000 keys; desired + reported at most 96 KiB (413 for bytes, 422 for depth or keys).
    """
    patch = await document(request_, "patch")
    request = SetDesired(actor=actor_of(claims), patch=patch, expected_version=_version(if_match))

    async def update(handle: WorkflowHandle[Any, Any]) -> DesiredSet:
        result: DesiredSet = await handle.execute_update(DeviceTwin.set_desired, request)
        return result

    try:
        result = await on_twin(state, claims.tenant, device_id, update)
    except WorkflowUpdateFailedError as exc:
        raise refusal(exc) from None
    except RPCError as exc:
        if exc.status == RPCStatusCode.RESOURCE_EXHAUSTED:  # the twin's limit of updates in flight
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail=exc.message) from None
        raise
    response.headers["ETag"] = f'"{result.version}"'
    # MQTT gateways push the new document to the device
    await notify_twin_changed(state.pool, claims.tenant, device_id)
    return result


@router.post(
    "/v1/device/twin/reported",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeltaView,
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": body_schema(ReportedBody)}},
            "required": True,
        }
    },
)
async def report(request: Request, state: State, device: Device) -> DeltaView:
    """The device reports what it applied; answers with what is still to do.

    Limits as for desired: 413 for bytes, 422 for depth or keys, and nothing is recorded.
    """
    claims, _ = device
    try:
        body = ReportedBody.model_validate(await json_body(request))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise invalid(["body", *first["loc"]], first["msg"]) from None
    breach = document_breach(body.reported, "reported")
    if breach is not None:
        raise limit_problem(["body", "reported"], breach)
    signal = ReportState(patch=body.reported, at=datetime.now(UTC))

    async def send(handle: WorkflowHandle[Any, Any]) -> TwinState:
        before: TwinState = await handle.query(DeviceTwin.get)
        # checked here, so an oversize report is refused and never enters the history (the twin
        # checks again and drops one that raced another change past a limit)
        refused = change_breach(before, before.desired, merge_patch(before.reported, body.reported))
        if refused is not None:
            raise limit_problem(["body", "reported"], refused)
        await handle.signal(DeviceTwin.report, signal)
        result: TwinState = await handle.query(DeviceTwin.get)
        return result

    current = await on_twin(state, claims.tenant, claims.device_id, send)
    # the device's MQTT connection (if any) gets its new delta
    await notify_twin_changed(state.pool, claims.tenant, claims.device_id, reported=True)
    return DeltaView(delta=delta(current.desired, current.reported), desired_version=current.desired_version)


@router.get("/v1/device/twin/delta", response_model=DeltaView)
async def wait_for_delta(
    http: Request,
    state: State,
    device: Device,
    wait: Annotated[int, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for a delta")] = 0,
) -> DeltaView | Response:
    """What the device must still apply; with `wait`, holds the request until there is some.

    The twin itself holds the wait (its `wait_for_delta` update completes on a change), so a
    waiting device costs no polling of Temporal. One waiter per device: a second concurrent one
    gets 429; a waiter whose client hangs up is released at once.
    """
    claims, _ = device
    current = await twin_state(state, claims.tenant, claims.device_id)
    pending = delta(current.desired, current.reported)
    answer = DeltaView(delta=pending, desired_version=current.desired_version)
    if answer.delta or wait == 0:
        return answer
    return await long_poll(http, state, claims.tenant, claims.device_id, wait, answer)


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
