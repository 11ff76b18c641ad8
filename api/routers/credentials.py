"""Device credentials: renewal by the device, rotation by operators (one device or a fleet),
and the JWKS document that lets other systems verify fleetflow's tokens.

Every renewal and rotation is a CredentialRotation run (workflows/credential_rotation.py);
the credential check (api/credentials.py, the device service's `credential_valid_until`)
honours the replaced credentials' `valid_until`, so the MQTT gateway and the HTTP API refuse
them at the same moment.
"""

from __future__ import annotations

import csv
import hashlib
import io
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, status
from fastapi.responses import PlainTextResponse
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError

from api.auth import State, require, require_device
from api.models.devices import FleetRotateBody, RenewedCredential, RotateBody, RotationAccepted
from api.problems import conflict, invalid, not_found
from api.state import AppState
from api.workflow_wait import result_within
from fleetflow import claim_checks
from fleetflow.contracts.common import TaskQueue, tenant_scoped_id
from fleetflow.contracts.devices import RotateCredentials, RotationView
from fleetflow.contracts.limits import DEVICE_ID_MAX_CHARS
from fleetflow.security import DeviceClaims, TokenClaims
from workflows.credential_rotation import CredentialRotation, rotation_workflow_id

router = APIRouter(tags=["credentials"])
Device = Annotated[tuple[DeviceClaims, str], Depends(require_device)]
Reader = Annotated[TokenClaims, Depends(require("devices:read"))]
Writer = Annotated[TokenClaims, Depends(require("devices:write"))]


async def _rotate(state: AppState, request: RotateCredentials) -> RotateCredentials:
    """Run the rotation (joining one of the same id that is running) and wait for it."""
    handle = await state.temporal.start_workflow(
        CredentialRotation.run,
        request,
        id=rotation_workflow_id(request.tenant, request.rotation_id),
        task_queue=TaskQueue.ORCHESTRATION.value,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    return await result_within(
        handle,
        state.settings.workflow_wait_s,
        f"credential rotation {request.rotation_id}",
        f"/v1/credential-rotations/{request.rotation_id}",
    )


async def _one(state: AppState, request: RotateCredentials, device_id: str) -> RenewedCredential:
    """Rotate one device's credential and hand the new one out."""
    await _rotate(state, request)
    issued = await state.devices.rotated_credentials(request.tenant, request.rotation_id, device_id)
    if not issued:
        outcome = await state.devices.rotation_outcomes(request.tenant, request.rotation_id)
        reason = outcome[0]["reason"] if outcome else "nothing was rotated"
        raise conflict(f"device {device_id!r}: {reason}")
    _, token, expires_at = issued[0]
    return RenewedCredential(
        device_id=device_id, credential=token, expires_at=expires_at, rotation_id=request.rotation_id
    )


@router.post("/v1/device/credential:renew", response_model=RenewedCredential)
async def renew(state: State, device: Device) -> RenewedCredential:
    """A device renews the credential it authenticates with: the new one is in the answer, and
    the presented one stays valid for the device type's overlap (default 1 day), then is
    refused. Repeating the call with the same credential (an answer lost on the way) gives the
    same new credential; a revoked, expired or already-ended credential gets 401, one replaced
    by another renewal or an operator's rotation (still in its overlap) 409."""
    claims, _ = device
    # one renewal per presented credential: its id is the business id of the run
    digest = hashlib.sha256(f"{claims.tenant}\0{claims.device_id}\0{claims.jti}".encode()).hexdigest()[:32]
    request = RotateCredentials(
        tenant=claims.tenant,
        rotation_id=f"renew-{digest}",
        actor=f"device:{claims.device_id}",
        device_ids=[claims.device_id],
        from_jti=claims.jti,
    )
    return await _one(state, request, claims.device_id)


@router.post("/v1/devices/{device_id}/credential:rotate", response_model=RenewedCredential)
async def rotate_one(
    device_id: str, state: State, claims: Writer, body: RotateBody | None = None
) -> RenewedCredential:
    """Give an active device a new credential (in the answer, once); its current ones stay
    valid for `overlap_s` (default: the device type's), `0` ends them at once."""
    if (
        len(device_id) > DEVICE_ID_MAX_CHARS
        or await state.devices.get_device(claims.tenant, device_id) is None
    ):
        raise not_found(f"device {device_id!r}")
    request = RotateCredentials(
        tenant=claims.tenant,
        rotation_id=f"rot-{uuid.uuid4().hex}",
        actor=claims.subject,
        device_ids=[device_id],
        overlap_s=None if body is None else body.overlap_s,
    )
    return await _one(state, request, device_id)


@router.post(
    "/v1/credential-rotations", status_code=status.HTTP_202_ACCEPTED, response_model=RotationAccepted
)
async def rotate_fleet(body: FleetRotateBody, state: State, claims: Writer) -> RotationAccepted:
    """Rotate a fleet's credentials: `device_ids` (up to 1,000), or every active device of
    `device_type` and/or with all `tags`; batched (200 devices a step), an outcome per device."""
    if body.device_ids is None and body.device_type is None and not body.tags:
        raise invalid(["body"], "name device_ids, or a device_type and/or tags")
    if body.device_ids is not None and (body.device_type is not None or body.tags):
        raise invalid(["body", "device_ids"], "either device_ids or device_type/tags, not both")
    rotation_id = f"rot-{uuid.uuid4().hex}"
    ids_claim = None
    if body.device_ids is not None:  # stored once: only its id travels through history
        ids_claim = tenant_scoped_id("rotation-devices", claims.tenant, rotation_id)
        await claim_checks.store(
            state.pool, ids_claim, claims.tenant, "rotation-devices", sorted(set(body.device_ids))
        )
    request = RotateCredentials(
        tenant=claims.tenant,
        rotation_id=rotation_id,
        actor=claims.subject,
        ids_claim=ids_claim,
        device_type=body.device_type,
        tags=body.tags,
        overlap_s=body.overlap_s,
    )
    try:
        await state.temporal.start_workflow(
            CredentialRotation.run,
            request,
            id=rotation_workflow_id(claims.tenant, rotation_id),
            task_queue=TaskQueue.ORCHESTRATION.value,
        )
    except BaseException:
        if ids_claim is not None:
            await claim_checks.discard(state.pool, ids_claim, claims.tenant)
        raise
    return RotationAccepted(rotation_id=rotation_id, status_url=f"/v1/credential-rotations/{rotation_id}")


async def _status(state: AppState, tenant: str, rotation_id: str) -> str | None:
    handle = state.temporal.get_workflow_handle(rotation_workflow_id(tenant, rotation_id))
    try:
        described = await handle.describe()
    except RPCError:
        return None
    if described.status == WorkflowExecutionStatus.COMPLETED:
        return "completed"
    if described.status in (WorkflowExecutionStatus.RUNNING, WorkflowExecutionStatus.CONTINUED_AS_NEW):
        return "running"
    return "failed"


@router.get("/v1/credential-rotations/{rotation_id}", response_model=RotationView)
async def rotation(
    rotation_id: str,
    state: State,
    claims: Reader,
    after: Annotated[str, Query(max_length=DEVICE_ID_MAX_CHARS)] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> RotationView:
    """A rotation's status, counts and per-device outcomes (by device id; `after` pages on)."""
    found = None if len(rotation_id) > 200 else await _status(state, claims.tenant, rotation_id)
    if found is None:
        raise not_found(f"credential rotation {rotation_id!r}")
    counts = await state.devices.rotation_counts(claims.tenant, rotation_id)
    devices: list[dict[str, Any]] = await state.devices.rotation_outcomes(
        claims.tenant, rotation_id, after=after, limit=limit
    )
    return RotationView(
        rotation_id=rotation_id,
        status=found,
        rotated=counts.get("rotated", 0),
        skipped=counts.get("skipped", 0),
        devices=devices,
    )


class CsvResponse(PlainTextResponse):
    """A CSV document (documented as text/csv)."""

    media_type = "text/csv"


@router.get("/v1/credential-rotations/{rotation_id}/credentials", response_class=CsvResponse)
async def rotation_credentials(rotation_id: str, state: State, claims: Writer) -> CsvResponse:
    """CSV `device_id,credential,expires_at` of the rotation's new credentials still live."""
    if len(rotation_id) > 200 or await _status(state, claims.tenant, rotation_id) is None:
        raise not_found(f"credential rotation {rotation_id!r}")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["device_id", "credential", "expires_at"])
    for device_id, token, expires_at in await state.devices.rotated_credentials(claims.tenant, rotation_id):
        writer.writerow([device_id, token, expires_at.isoformat()])
    return CsvResponse(out.getvalue())


@router.get("/.well-known/jwks.json")
async def jwks(state: State) -> dict[str, Any]:
    """The public keys (JWKS, RFC 7517) of every signing key that still verifies, rotated ones
    included: anyone verifies fleetflow's tokens (ES256, by `kid`) with this alone."""
    return state.keys.jwks()
