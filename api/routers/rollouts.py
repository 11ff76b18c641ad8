"""Firmware, rollout campaigns, the devices' jobs, and decommissioning."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from temporalio.client import WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.device_firmware import FirmwareAbandoned, FirmwareConflict, FirmwareEmpty, FirmwareTooLarge
from activities.device_mqtt import notify_twin_changed
from api.auth import State, actor_of, require, require_device
from api.byte_ranges import Unsatisfiable, byte_range, if_range_holds, none_match
from api.limits import FIRMWARE_MAX_BODY_BYTES
from api.models.base import as_contract
from api.models.onboardings import Decision
from api.models.rollouts import BulkDecommissionRequest, DecommissionRequest, RolloutBody
from api.problems import conflict, invalid, not_found, progress_or_404
from fleetflow import claim_checks
from fleetflow.contracts.common import TaskQueue, tenant_scoped_id
from fleetflow.contracts.devices import DeviceStatus
from fleetflow.contracts.limits import DeviceTypeName, FirmwareVersion
from fleetflow.contracts.rollouts import (
    CampaignDeviceView,
    DecommissionInput,
    DecommissionProgress,
    FirmwareView,
    JobReport,
    JobView,
    RolloutDecision,
    RolloutInput,
    RolloutProgress,
    RolloutRequest,
    TargetClaim,
)
from fleetflow.contracts.twin import ReportState
from fleetflow.security import DeviceClaims, TokenClaims
from fleetflow.temporal import device_search_attributes
from workflows.device_decommission import DeviceDecommission, decommission_id
from workflows.device_twin import DeviceTwin, twin_id
from workflows.firmware_rollout import FirmwareRollout, rollout_id

router = APIRouter(tags=["rollouts"])
Admin = Annotated[TokenClaims, Depends(require("rollouts:admin"))]
Reader = Annotated[TokenClaims, Depends(require("devices:read"))]
Device = Annotated[tuple[DeviceClaims, str], Depends(require_device)]


@router.post(
    "/v1/firmware",
    status_code=status.HTTP_201_CREATED,
    response_model=FirmwareView,
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def upload_firmware(
    request: Request,
    state: State,
    claims: Admin,
    response: Response,
    device_type: Annotated[DeviceTypeName, Query()],
    version: Annotated[FirmwareVersion, Query()],
) -> FirmwareView:
    """Upload an image (the raw body) for a device type; the same version with other content is 409."""
    if await state.devices.device_type(claims.tenant, device_type) is None:
        raise invalid(["query", "device_type"], f"unknown device type {device_type!r}")
    try:  # streamed into the store a chunk at a time: never the whole image in memory
        view, created = await state.devices.put_firmware(
            claims.tenant, device_type, version, request.stream(), FIRMWARE_MAX_BODY_BYTES
        )
    except FirmwareEmpty:
        raise invalid(["body"], "the image is empty") from None
    except FirmwareTooLarge:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, f"an image is at most {FIRMWARE_MAX_BODY_BYTES} bytes"
        ) from None
    except FirmwareConflict as exc:
        raise conflict(str(exc)) from None
    except FirmwareAbandoned:  # nothing of it is kept: the whole image again
        raise HTTPException(
            status.HTTP_408_REQUEST_TIMEOUT,
            "the upload stalled too long and was discarded; send the image again",
        ) from None
    if not created:
        response.status_code = status.HTTP_200_OK
    return view


@router.get("/v1/firmware/{firmware_id}", response_model=FirmwareView)
async def firmware(firmware_id: str, state: State, claims: Reader) -> FirmwareView:
    """A firmware image's metadata."""
    view = await state.devices.firmware(claims.tenant, firmware_id)
    if view is None:
        raise not_found(f"firmware {firmware_id!r}")
    return view


@router.get(
    "/v1/device/firmware/{firmware_id}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "the range asked for"},
        304: {"description": "If-None-Match names the image's ETag"},
        416: {"description": "the range starts past the end"},
    },
)
async def download_firmware(
    firmware_id: str,
    state: State,
    device: Device,
    range_: Annotated[str | None, Header(alias="range")] = None,
    if_range: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The image for the calling device, from the shared store (`Range`, `If-Range` and the
    image's ETag supported, for resumable downloads)."""
    claims, _ = device
    view = await state.devices.firmware(claims.tenant, firmware_id)
    own = await state.devices.get_device(claims.tenant, claims.device_id)
    if view is None or own is None or own.device_type != view.device_type:
        raise not_found(f"firmware {firmware_id!r}")
    etag = f'"{view.sha256}"'  # the content's digest: the same on every host
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "X-Firmware-Sha256": view.sha256}
    if none_match(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    try:
        asked = byte_range(range_, view.size) if if_range_holds(if_range, etag) else None
    except Unsatisfiable:
        return Response(
            status_code=status.HTTP_416_RANGE_NOT_SATISFIABLE,
            headers={**headers, "Content-Range": f"bytes */{view.size}"},
        )
    start, end = asked or (0, view.size)
    body = await state.devices.firmware_bytes(claims.tenant, firmware_id, start, end)
    if body is None:
        raise not_found(f"firmware {firmware_id!r}")
    headers["Content-Length"] = str(end - start)
    if asked is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{view.size}"
    return StreamingResponse(
        body,
        status_code=status.HTTP_206_PARTIAL_CONTENT if asked else status.HTTP_200_OK,
        media_type="application/octet-stream",
        headers=headers,
    )


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@router.post("/v1/rollouts", status_code=status.HTTP_202_ACCEPTED)
async def start_rollout(body: RolloutBody, state: State, claims: Admin, response: Response) -> dict[str, Any]:
    """Start a campaign; the same request again is the same campaign, another one 409."""
    if body.command is not None:  # a command campaign: its devices' type must exist
        if await state.devices.device_type(claims.tenant, body.device_type or "") is None:
            raise invalid(["body", "device_type"], f"no device type {body.device_type!r}")
    elif await state.devices.firmware(claims.tenant, body.firmware_id) is None:
        raise invalid(["body", "firmware_id"], f"no firmware {body.firmware_id!r}")
    wid = rollout_id(claims.tenant, body.campaign_id)
    digest = _fingerprint(body.model_dump(mode="json"))
    request = as_contract(body, RolloutRequest)
    inp = RolloutInput(tenant=claims.tenant, actor=actor_of(claims), request=request)
    stored = False
    if body.target.device_ids is not None:  # up to 100,000 ids: a claim check, not history
        claim_id = tenant_scoped_id("rollout-targets", claims.tenant, f"{body.campaign_id}/{digest[:32]}")
        stored = await claim_checks.store(
            state.pool, claim_id, claims.tenant, "rollout-targets", body.target.device_ids
        )
        inp.targets = TargetClaim(claim_id=claim_id, count=len(body.target.device_ids))
        inp.request = request.model_copy(
            update={"target": request.target.model_copy(update={"device_ids": None})}
        )
    try:
        await state.temporal.start_workflow(
            FirmwareRollout.run,
            inp,
            id=wid,
            task_queue=TaskQueue.ORCHESTRATION.value,
            memo={"request_hash": digest},
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=device_search_attributes(
                claims.tenant, "rollout" if body.command is None else "command-campaign"
            ),
        )
    except WorkflowAlreadyStartedError:
        described = await state.temporal.get_workflow_handle(wid).describe()
        if await described.memo_value("request_hash", default=None) != digest:
            if stored and inp.targets is not None:  # this request's list belongs to no campaign
                await claim_checks.discard(state.pool, inp.targets.claim_id, claims.tenant)
            raise conflict(f"campaign {body.campaign_id!r} exists with another request") from None
        response.status_code = status.HTTP_200_OK
    return {
        "workflow_id": wid,
        "status_url": f"/v1/rollouts/{body.campaign_id}",
        "temporal_ui_url": state.ui_url(wid),
    }


@router.get("/v1/rollouts/{campaign_id}", response_model=RolloutProgress)
async def rollout_progress(campaign_id: str, state: State, claims: Reader) -> RolloutProgress:
    """Counts per state, the current wave, and why it stopped if it did."""
    handle = state.temporal.get_workflow_handle(rollout_id(claims.tenant, campaign_id))
    return await progress_or_404(handle, f"campaign {campaign_id!r}", RolloutProgress)


@router.get("/v1/rollouts/{campaign_id}/devices", response_model=list[CampaignDeviceView])
async def rollout_devices(
    campaign_id: str,
    state: State,
    claims: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=128, description="the last device id seen")] = None,
) -> list[CampaignDeviceView]:
    """Each device's outcome, by device id (a command campaign's: the command's status and answer)."""
    return await state.devices.campaign_devices(claims.tenant, campaign_id, limit, after)


async def _decide(
    campaign_id: str, update: str, state: State, claims: TokenClaims, reason: str | None
) -> RolloutProgress:
    handle = state.temporal.get_workflow_handle(rollout_id(claims.tenant, campaign_id))
    try:
        result: RolloutProgress = await handle.execute_update(
            update, RolloutDecision(actor=actor_of(claims), reason=reason), result_type=RolloutProgress
        )
    except WorkflowUpdateFailedError as exc:
        raise conflict(str(exc.cause or exc)) from None
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise not_found(f"running campaign {campaign_id!r}") from None
        raise conflict(exc.message) from None
    return result


@router.post("/v1/rollouts/{campaign_id}/pause", response_model=RolloutProgress)
async def pause(campaign_id: str, state: State, claims: Admin) -> RolloutProgress:
    """Offer no new device the update until resumed."""
    return await _decide(campaign_id, "pause", state, claims, None)


@router.post("/v1/rollouts/{campaign_id}/resume", response_model=RolloutProgress)
async def resume(campaign_id: str, state: State, claims: Admin) -> RolloutProgress:
    """Go on after a pause."""
    return await _decide(campaign_id, "resume", state, claims, None)


@router.post("/v1/rollouts/{campaign_id}/cancel", response_model=RolloutProgress)
async def cancel(
    campaign_id: str, state: State, claims: Admin, body: Annotated[Decision, Body()] = Decision()
) -> RolloutProgress:
    """Stop the campaign and roll back the devices that took the new firmware."""
    return await _decide(campaign_id, "cancel", state, claims, body.reason)


@router.get("/v1/device/jobs", response_model=JobView, responses={204: {"description": "no job"}})
async def device_job(state: State, device: Device) -> Any:
    """The job the calling device should work on now; 204 when there is none."""
    claims, _ = device
    job = await state.devices.pending_job(claims.tenant, claims.device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT) if job is None else job


@router.post("/v1/device/jobs/{campaign_id}/progress", status_code=status.HTTP_202_ACCEPTED)
async def device_job_progress(
    campaign_id: str, body: JobReport, state: State, device: Device
) -> dict[str, str]:
    """The device reports downloading, installing, succeeded or failed."""
    claims, _ = device
    try:
        installed = await state.devices.report_job(
            claims.tenant, claims.device_id, campaign_id, body.kind, body.state, body.detail
        )
    except LookupError as exc:
        raise not_found(str(exc)) from None
    except ValueError as exc:
        raise conflict(str(exc)) from None
    if installed is not None:  # the twin's reported state follows the firmware actually running
        twin = state.temporal.get_workflow_handle(twin_id(claims.tenant, claims.device_id))
        try:
            await twin.signal(
                DeviceTwin.report, ReportState(patch={"firmware_version": installed}, at=datetime.now(UTC))
            )
        except RPCError:
            pass  # no twin yet: it will start from the registry, which has the new version
        else:
            await notify_twin_changed(state.pool, claims.tenant, claims.device_id, reported=True)
    return {"state": body.state}


async def _decommission(
    state: State, claims: TokenClaims, device_id: str, body: DecommissionRequest
) -> dict[str, str]:
    device = await state.devices.get_device(claims.tenant, device_id)
    if device is None:
        raise not_found(f"device {device_id!r}")
    wid = decommission_id(claims.tenant, device_id)
    if device.status != DeviceStatus.DECOMMISSIONED:
        try:
            await state.temporal.start_workflow(
                DeviceDecommission.run,
                DecommissionInput(
                    tenant=claims.tenant,
                    device_id=device_id,
                    actor=actor_of(claims),
                    telemetry=body.telemetry,
                    reason=body.reason,
                ),
                id=wid,
                task_queue=TaskQueue.ORCHESTRATION.value,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                search_attributes=device_search_attributes(claims.tenant, "decommission", device_id),
            )
        except WorkflowAlreadyStartedError:
            pass  # running or done: the same retirement
    return {"device_id": device_id, "workflow_id": wid, "status_url": f"/v1/decommissions/{device_id}"}


@router.post("/v1/devices/{device_id}:decommission", status_code=status.HTTP_202_ACCEPTED)
async def decommission(
    device_id: str,
    state: State,
    claims: Admin,
    body: Annotated[DecommissionRequest, Body()] = DecommissionRequest(),
) -> dict[str, str]:
    """Retire a device: credentials revoked, twin ended, jobs cancelled, telemetry archived."""
    return await _decommission(state, claims, device_id, body)


@router.post("/v1/devices:decommission", status_code=status.HTTP_202_ACCEPTED)
async def decommission_many(
    body: BulkDecommissionRequest, state: State, claims: Admin
) -> list[dict[str, str]]:
    """Retire up to 1,000 devices, one DeviceDecommission run each; none when any id is unknown."""
    unknown = [d for d in body.device_ids if await state.devices.get_device(claims.tenant, d) is None]
    if unknown:
        raise not_found(f"device(s) {', '.join(map(repr, unknown[:20]))}")
    single = DecommissionRequest(telemetry=body.telemetry, reason=body.reason)
    return [await _decommission(state, claims, d, single) for d in body.device_ids]


@router.get("/v1/decommissions/{device_id}", response_model=DecommissionProgress)
async def decommission_progress(device_id: str, state: State, claims: Reader) -> DecommissionProgress:
    """Steps done, the current one, and the error if it is stuck."""
    handle = state.temporal.get_workflow_handle(decommission_id(claims.tenant, device_id))
    return await progress_or_404(handle, f"decommissioning of {device_id!r}", DecommissionProgress)
