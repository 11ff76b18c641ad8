"""Device twins: desired/reported state, the device's long-poll, history and time travel."""

from __future__ import annotations

import asyncio
import json
import math
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from pydantic import ValidationError
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.notifications import NotificationService
from api.auth import State, actor_of, require, require_device
from api.limits import TWIN_DOCUMENT_MAX_BYTES
from api.openapi import body_schema
from api.problems import conflict, invalid, not_found
from api.state import AppState
from api.time_travel import HistoryEntry, NoTwinThen, device_history, twin_as_of
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.devices import DeviceStatus
from fleetflow.contracts.twin import (
    MAX_DOCUMENT_DEPTH,
    DeltaView,
    DesiredSet,
    ReportedBody,
    ReportState,
    SetDesired,
    TwinInput,
    TwinState,
    TwinView,
    WaitForDelta,
)
from fleetflow.security import DeviceClaims, TokenClaims
from fleetflow.temporal import device_search_attributes
from fleetflow.twin_state import Breach, change_breach, delta, document_breach, merge_patch, view
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
MAX_BODY_BYTES = TWIN_DOCUMENT_MAX_BYTES  # BodyLimit refuses a larger body before it is read
RESTART_PAUSE_S = 0.2  # while the twin continues as new, before asking the next run
WAIT_GRACE_S = 10  # how long past its wait a long-poll waits for the twin's answer
MIN_REWAIT_S = 1.0  # less time left than this: answer rather than wait again
CLIENT_CLOSED_REQUEST = 499  # the status of a long-poll whose device hung up (as nginx logs it)


def _limit_problem(loc: list[str | int], breach: Breach) -> HTTPException:
    """413 (bytes) or 422 (depth, keys), naming the document and the limit."""
    detail = [{"loc": loc, "msg": f"{breach.what} {breach.reason}", "type": f"limit.{breach.limit}"}]
    return HTTPException(breach.status, detail=detail)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


async def _json_body(request: Request) -> Any:
    """The request's JSON body, refused with 413 past MAX_BODY_BYTES before it is read whole."""
    too_large = Breach("body", "bytes", f"must be at most {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _limit_problem(["body"], too_large)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise _limit_problem(["body"], too_large)
    try:
        return json.loads(raw, parse_float=_finite, parse_constant=_constant)
    except RecursionError:
        deep = Breach("body", "depth", f"must nest at most {MAX_DOCUMENT_DEPTH} levels deep")
        raise _limit_problem(["body"], deep) from None
    except ValueError:
        raise invalid(["body"], "is not valid JSON (finite numbers only)") from None


async def _document(request: Request, what: str) -> dict[str, Any]:
    """A twin document (or patch) from the body: a JSON object within the document limits."""
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise invalid(["body"], "must be a JSON object")
    breach = document_breach(body, what)
    if breach is not None:
        raise _limit_problem(["body"], breach)
    return body


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


_DOCUMENT_BODY = {"type": "object", "description": "a JSON object (twin document limits apply)"}


@router.patch("/v1/devices/{device_id}/twin/desired", response_model=DesiredSet,
              openapi_extra={"requestBody": {"content": {"application/json": {"schema": {
                  **_DOCUMENT_BODY, "description": "JSON merge patch of the desired document"}}},
                  "required": True}})  # fmt: skip
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
    patch = await _document(request_, "patch")
    request = SetDesired(actor=actor_of(claims), patch=patch, expected_version=_version(if_match))

    async def update(handle: WorkflowHandle[Any, Any]) -> DesiredSet:
        result: DesiredSet = await handle.execute_update(DeviceTwin.set_desired, request)
        return result

    try:
        result = await _on_twin(state, claims.tenant, device_id, update)
    except WorkflowUpdateFailedError as exc:
        raise _refusal(exc) from None
    except RPCError as exc:
        if exc.status == RPCStatusCode.RESOURCE_EXHAUSTED:  # the twin's limit of updates in flight
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail=exc.message) from None
        raise
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
        loc = list(cause.details[2]) if len(cause.details) > 2 else path.split(".")
        return invalid(["body", *loc[1:]], reason)
    if cause.type == "TooLarge" and len(cause.details) > 1:
        what, limit = str(cause.details[0]), str(cause.details[1])
        if limit in ("bytes", "depth", "keys"):
            return _limit_problem(["body"], Breach(what, limit, cause.message))  # type: ignore[arg-type]
    if cause.type == "Forbidden":
        return HTTPException(status.HTTP_403_FORBIDDEN, detail=cause.message)
    return conflict(cause.message)


@router.post("/v1/device/twin/reported", status_code=status.HTTP_202_ACCEPTED, response_model=DeltaView,
             openapi_extra={"requestBody": {"content": {"application/json": {
                 "schema": body_schema(ReportedBody)}}, "required": True}})  # fmt: skip
async def report(request: Request, state: State, device: Device) -> DeltaView:
    """The device reports what it applied; answers with what is still to do.

    Limits as for desired: 413 for bytes, 422 for depth or keys, and nothing is recorded.
    """
    claims, _ = device
    try:
        body = ReportedBody.model_validate(await _json_body(request))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise invalid(["body", *first["loc"]], first["msg"]) from None
    breach = document_breach(body.reported, "reported")
    if breach is not None:
        raise _limit_problem(["body", "reported"], breach)
    signal = ReportState(patch=body.reported, at=datetime.now(UTC))

    async def send(handle: WorkflowHandle[Any, Any]) -> TwinState:
        before: TwinState = await handle.query(DeviceTwin.get)
        # checked here, so an oversize report is refused and never enters the history (the twin
        # checks again and drops one that raced another change past a limit)
        refused = change_breach(before, before.desired, merge_patch(before.reported, body.reported))
        if refused is not None:
            raise _limit_problem(["body", "reported"], refused)
        await handle.signal(DeviceTwin.report, signal)
        result: TwinState = await handle.query(DeviceTwin.get)
        return result

    current = await _on_twin(state, claims.tenant, claims.device_id, send)
    return DeltaView(delta=delta(current.desired, current.reported), desired_version=current.desired_version)


def _busy(wait: int) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail="this device already has a long-poll waiting: one at a time",
        headers={"Retry-After": str(max(wait, 1))},
    )


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
    current = await _twin_state(state, claims.tenant, claims.device_id)
    pending = delta(current.desired, current.reported)
    answer = DeltaView(delta=pending, desired_version=current.desired_version)
    if answer.delta or wait == 0:
        return answer
    key = (claims.tenant, claims.device_id)
    if key in state.twin_waiters:
        raise _busy(wait)  # this process already holds one: no need to ask the twin
    state.twin_waiters.add(key)
    waiter_id = uuid.uuid4().hex
    release = state.temporal.get_workflow_handle(twin_id(claims.tenant, claims.device_id))
    try:
        return await _held(http, state, claims.tenant, claims.device_id, wait, answer, waiter_id)
    except asyncio.CancelledError:
        # the device is gone: end its wait in the twin too, or its next request would get 429
        await asyncio.shield(release.signal(DeviceTwin.release_wait, waiter_id))
        raise
    except _HungUp:
        # as above; a device dropping its connection is routine, not a server error (an
        # exception here was logged as one, with its traceback): answered for the access log
        await asyncio.shield(release.signal(DeviceTwin.release_wait, waiter_id))
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        state.twin_waiters.discard(key)


class _HungUp(Exception):
    """The client of a long-poll disconnected."""


async def _unless_hung_up(http: Request, work: Awaitable[T]) -> T:
    """work's result; _HungUp (and work cancelled) when the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        # the server delivers http.disconnect when the client hangs up (the body is read by then)
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            # the SDK ends a cancelled update call with an error of its own: retrieved here,
            # or asyncio logs "Task exception was never retrieved" for every hang-up
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise _HungUp
        return task.result()
    finally:
        task.cancel()
        watcher.cancel()


async def _held(
    http: Request, state: AppState, tenant: str, device_id: str, wait: int, answer: DeltaView, waiter_id: str
) -> DeltaView:
    """Wait on the twin's `wait_for_delta` until there is a delta or the wait is over."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    tries = 0
    while (left := deadline - loop.time()) > 0 and (tries == 0 or left >= MIN_REWAIT_S):
        tries += 1
        request = WaitForDelta(tenant=tenant, device_id=device_id, timeout_s=left, waiter_id=waiter_id)

        async def hold(handle: WorkflowHandle[Any, Any], request: WaitForDelta = request) -> DeltaView:
            result: DeltaView = await handle.execute_update(DeviceTwin.wait_for_delta, request)
            return result

        try:
            async with asyncio.timeout(left + WAIT_GRACE_S):
                answer = await _unless_hung_up(http, _on_twin(state, tenant, device_id, hold))
        except TimeoutError:
            break  # the twin did not answer (its worker is down): answer what we know
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            kind = cause.type if isinstance(cause, ApplicationError) else None
            if kind == "WaiterBusy":
                raise _busy(wait) from None
            if kind == "Restarting":
                await asyncio.sleep(RESTART_PAUSE_S)
                continue
            if kind == "TwinEnded":
                break
            raise _refusal(exc) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.RESOURCE_EXHAUSTED:  # the twin's limit of updates in flight
                raise _busy(wait) from None
            raise
        if answer.delta:
            break
    return answer


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
