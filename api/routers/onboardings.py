"""Onboarding runs: progress, approval, cancellation, bulk progress and credentials, device contact."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Query, status
from fastapi.responses import PlainTextResponse
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from api.auth import State, actor_of, require, require_device
from api.models.onboardings import Contact, ContactAccepted, Decision
from api.problems import conflict, not_found, progress_or_404
from fleetflow.contracts.devices import (
    ApprovalDecision,
    BulkProgress,
    DeviceStatus,
    FirstContact,
    OnboardingProgress,
)
from fleetflow.contracts.limits import MAX_BULK_DEVICES
from fleetflow.handles import handle_for
from fleetflow.security import DeviceClaims, TokenClaims
from workflows.bulk_onboarding import BulkOnboarding, bulk_workflow_id
from workflows.device_onboarding import DeviceOnboarding, onboarding_id

router = APIRouter(tags=["onboardings"])
Reader = Annotated[TokenClaims, Depends(require("devices:read"))]
Writer = Annotated[TokenClaims, Depends(require("devices:write"))]
Approver = Annotated[TokenClaims, Depends(require("devices:approve"))]
Device = Annotated[tuple[DeviceClaims, str], Depends(require_device)]


def _missing(exc: RPCError) -> bool:
    return exc.status == RPCStatusCode.NOT_FOUND


@router.get("/v1/onboardings/{device_id}", response_model=OnboardingProgress)
async def progress(device_id: str, state: State, claims: Reader) -> OnboardingProgress:
    """Current step, completed steps, compensations; the credential until first contact (write scope)."""
    handle = handle_for(state.temporal, DeviceOnboarding.run, onboarding_id(claims.tenant, device_id))
    result = await progress_or_404(handle, f"onboarding of {device_id!r}", OnboardingProgress)
    if "devices:write" not in claims.scopes and "admin" not in claims.scopes:
        result.credential = None
    return result


async def _decide(
    device_id: str, update: str, body: Decision, state: State, claims: TokenClaims
) -> OnboardingProgress:
    handle = state.temporal.get_workflow_handle(onboarding_id(claims.tenant, device_id))
    decision = ApprovalDecision(actor=actor_of(claims), reason=body.reason)
    try:
        raw = await handle.execute_update(update, decision, result_type=OnboardingProgress)
    except WorkflowUpdateFailedError as exc:
        raise conflict(str(exc.cause or exc)) from None
    except RPCError as exc:
        if not _missing(exc):
            raise conflict(exc.message) from None
        try:  # an update on a closed run is NOT_FOUND too: tell the two apart
            closed = await handle.describe()
        except RPCError:
            raise not_found(f"onboarding of {device_id!r}") from None
        status_name = closed.status.name.lower() if closed.status else "closed"
        raise conflict(f"this onboarding is not awaiting approval ({status_name})") from None
    return OnboardingProgress.model_validate(raw)


@router.post("/v1/onboardings/{device_id}/approve", response_model=OnboardingProgress)
async def approve(
    device_id: str, state: State, claims: Approver, body: Annotated[Decision, Body()] = Decision()
) -> OnboardingProgress:
    """Approve an onboarding that awaits approval."""
    return await _decide(device_id, "approve", body, state, claims)


@router.post("/v1/onboardings/{device_id}/reject", response_model=OnboardingProgress)
async def reject(
    device_id: str, state: State, claims: Approver, body: Annotated[Decision, Body()] = Decision()
) -> OnboardingProgress:
    """Reject an onboarding that awaits approval; it compensates."""
    return await _decide(device_id, "reject", body, state, claims)


@router.delete("/v1/onboardings/{device_id}", status_code=status.HTTP_202_ACCEPTED)
async def cancel(device_id: str, state: State, claims: Writer) -> dict[str, str]:
    """Cancel a running onboarding; it undoes what it did."""
    handle = state.temporal.get_workflow_handle(onboarding_id(claims.tenant, device_id))
    try:
        description = await handle.describe()
    except RPCError as exc:
        if _missing(exc):
            raise not_found(f"onboarding of {device_id!r}") from None
        raise
    if description.status is None or description.status.name != "RUNNING":
        raise conflict(f"onboarding of {device_id!r} is not running")
    await handle.cancel()
    return {"status": "cancelling", "status_url": f"/v1/onboardings/{device_id}"}


@router.post("/v1/device-contact", response_model=ContactAccepted, status_code=status.HTTP_202_ACCEPTED)
async def device_contact(
    state: State, device: Device, body: Annotated[Contact, Body()] = Contact()
) -> ContactAccepted:
    """A device's first contact with its new credential; its onboarding goes on to activation."""
    claims, _ = device
    current = await state.devices.get_device(claims.tenant, claims.device_id)
    if current is None:
        raise not_found(f"device {claims.device_id!r}")
    if current.status == DeviceStatus.ACTIVE:
        return ContactAccepted(device_id=claims.device_id, status=current.status.value)
    handle = state.temporal.get_workflow_handle(onboarding_id(claims.tenant, claims.device_id))
    contact = FirstContact(jti=claims.jti, at=datetime.now(UTC), firmware_version=body.firmware_version)
    try:
        await handle.signal(DeviceOnboarding.first_contact, contact)
    except RPCError as exc:
        if _missing(exc):
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"device is {current.status.value}, not onboarding"
            ) from None
        raise
    return ContactAccepted(device_id=claims.device_id, status="activating")


@router.get("/v1/bulk-onboardings/{bulk_id}", response_model=BulkProgress)
async def bulk_progress(
    bulk_id: str,
    state: State,
    claims: Reader,
    failures_from: Annotated[int, Query(ge=0, le=MAX_BULK_DEVICES)] = 0,
) -> BulkProgress:
    """Counts of a bulk onboarding and its failures with their reasons, 1,000 from `failures_from` on
    (`failed` counts them all)."""
    handle = handle_for(state.temporal, BulkOnboarding.run, bulk_workflow_id(claims.tenant, bulk_id))
    what = f"bulk onboarding {bulk_id!r}"
    if failures_from == 0:  # as before paging: a worker that predates it answers this too
        return await progress_or_404(handle, what, BulkProgress)
    return await progress_or_404(handle, what, BulkProgress, failures_from)


@router.get("/v1/bulk-onboardings/{bulk_id}/credentials", response_class=PlainTextResponse)
async def bulk_credentials(bulk_id: str, state: State, claims: Writer) -> PlainTextResponse:
    """CSV `device_id,credential` of every device the bulk onboarding activated."""
    rows = await state.devices.bulk_credentials(claims.tenant, bulk_id)
    if not rows:
        raise not_found(f"credentials of bulk onboarding {bulk_id!r}")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["device_id", "credential"])
    writer.writerows(rows)
    return PlainTextResponse(out.getvalue(), media_type="text/csv")
