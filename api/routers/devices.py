"""Devices and device types: onboarding (single and bulk) and the registry read model."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import ValidationError
from temporalio.client import WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities import device_facade
from api.auth import State, actor_of, require
from api.limits import BULK_MAX_BODY_BYTES
from api.models.base import as_contract
from api.models.devices import (
    BulkAccepted,
    BulkOnboardRequest,
    DevicePage,
    DeviceTypeBody,
    OnboardDeviceBody,
    OnboardingAccepted,
)
from api.openapi import body_schema
from api.problems import conflict, invalid, not_found
from api.state import AppState
from fleetflow import claim_checks, config_schema
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.devices import (
    BulkOnboardingInput,
    DeviceSpec,
    DeviceStatus,
    DeviceTypeView,
    DeviceView,
    OnboardDeviceRequest,
    OnboardingInput,
    business_id_of,
)
from fleetflow.contracts.limits import DEVICE_ID_PATTERN, MAX_BULK_DEVICES, NAME_MAX_CHARS
from fleetflow.security import TokenClaims
from fleetflow.temporal import device_search_attributes
from fleetflow.twin_state import document_breach
from workflows.bulk_onboarding import BulkOnboarding, bulk_workflow_id
from workflows.device_onboarding import DeviceOnboarding, onboarding_id

router = APIRouter(tags=["devices"])
Reader = Annotated[TokenClaims, Depends(require("devices:read"))]
Writer = Annotated[TokenClaims, Depends(require("devices:write"))]
Admin = Annotated[TokenClaims, Depends(require("admin"))]

# schema steps the distinct configs of one bulk import may take together (25 single validations'
# worth): each of 10,000 devices could otherwise take a full budget of the API's event loop
BULK_VALIDATION_STEPS = 25 * config_schema.MAX_VALIDATION_STEPS


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def _memo_hash(handle: WorkflowHandle[Any, Any]) -> str | None:
    description = await handle.describe()
    value = await description.memo_value("request_hash", default=None)
    return str(value) if value is not None else None


async def _check_config(state: AppState, tenant: str, spec: DeviceSpec, loc: list[str | int]) -> None:
    try:
        await state.devices.resolve_config(tenant, spec)
    except LookupError as exc:
        raise invalid([*loc, "device_type"], str(exc)) from None
    except config_schema.ConfigError as exc:
        raise invalid([*loc, *exc.loc], exc.reason) from None


@router.post("/v1/devices", status_code=status.HTTP_202_ACCEPTED, response_model=OnboardingAccepted)
async def onboard(
    body: OnboardDeviceBody, state: State, claims: Writer, response: Response
) -> OnboardingAccepted:
    """Start the onboarding saga; the same request again returns the same run, another one 409."""
    await _check_config(state, claims.tenant, body, ["body"])
    tenant = claims.tenant
    wid = onboarding_id(tenant, body.device_id)
    existing = await state.devices.get_device(tenant, body.device_id)
    owned = existing is not None and business_id_of(existing.onboarding_id) == wid
    if existing is not None and existing.status != DeviceStatus.FAILED and not owned:
        raise conflict(f"device {body.device_id!r} is already registered ({existing.status.value})")
    if existing is None or existing.status == DeviceStatus.FAILED:
        await state.quotas.check_count(tenant, "max_devices")  # 403 at the tenant's device quota
    request_hash = _fingerprint(body.model_dump(mode="json"))
    try:
        handle = await state.temporal.start_workflow(
            DeviceOnboarding.run,
            OnboardingInput(
                tenant=tenant,
                actor=actor_of(claims),
                request=as_contract(body, OnboardDeviceRequest),
                request_hash=request_hash,
            ),
            id=wid,
            task_queue=TaskQueue.ORCHESTRATION.value,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            memo={"request_hash": request_hash},
            search_attributes=device_search_attributes(tenant, "onboarding", body.device_id),
        )
        run_id, is_new = handle.result_run_id, True
    except WorkflowAlreadyStartedError:
        handle = state.temporal.get_workflow_handle(wid)
        if await _memo_hash(handle) != request_hash:
            raise conflict(
                f"device {body.device_id!r} is being or was onboarded with another request"
            ) from None
        run_id, is_new = (await handle.describe()).run_id, False
    if not is_new:
        response.status_code = status.HTTP_200_OK
    return OnboardingAccepted(
        workflow_id=wid,
        run_id=run_id,
        status_url=f"/v1/onboardings/{body.device_id}",
        temporal_ui_url=state.ui_url(wid, run_id),
        existing=not is_new,
    )


@router.get("/v1/devices/{device_id}", response_model=DeviceView)
async def get_device(device_id: str, state: State, claims: Reader) -> DeviceView:
    """One device of the caller's tenant."""
    device = await state.devices.get_device(claims.tenant, device_id)
    if device is None:
        raise not_found(f"device {device_id!r}")
    return device


@router.get("/v1/devices", response_model=DevicePage)
async def list_devices(
    state: State,
    claims: Reader,
    status_: Annotated[DeviceStatus | None, Query(alias="status")] = None,
    device_type: Annotated[str | None, Query(alias="type", max_length=NAME_MAX_CHARS)] = None,
    tag: Annotated[str | None, Query(max_length=NAME_MAX_CHARS)] = None,
    cursor: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DevicePage:
    """The caller's devices by id; pass `next_cursor` back as `cursor` for the next page."""
    items = await state.devices.list_devices(
        claims.tenant,
        status=status_.value if status_ else None,
        device_type=device_type,
        tag=tag,
        after=cursor,
        limit=limit + 1,
    )
    more = len(items) > limit
    items = items[:limit]
    return DevicePage(items=items, next_cursor=items[-1].device_id if more else None)


def _csv_devices(raw: bytes) -> list[dict[str, Any]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise invalid(["body"], "CSV must be UTF-8") from None
    reader = csv.DictReader(io.StringIO(text))
    try:
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as exc:  # a stray carriage return, a NUL byte, an oversized field
        raise invalid(["body", f"line {reader.line_num}"], f"is not valid CSV: {exc}") from None
    allowed = {"device_id", "device_type", "firmware_version", "tags", "metadata", "config"}
    if not {"device_id", "device_type"} <= columns:
        raise invalid(["body", "header"], "CSV needs the columns device_id and device_type")
    if columns - allowed:
        raise invalid(["body", "header"], f"unknown CSV column(s): {', '.join(sorted(columns - allowed))}")
    devices = []
    for line, row in enumerate(rows, start=2):
        if None in row:  # DictReader keeps fields past the header under None
            raise invalid(["body", f"line {line}"], "has more fields than the header (quote a comma)")
        item: dict[str, Any] = {k: v for k, v in row.items() if v not in (None, "")}
        if "tags" in item:
            item["tags"] = [t for t in item["tags"].split(";") if t]
        for field in ("metadata", "config"):
            if field in item:
                try:
                    item[field] = json.loads(item[field])
                except ValueError:
                    raise invalid(["body", f"line {line}", field], "is not valid JSON") from None
        devices.append(item)
    return devices


@router.post(
    "/v1/devices:bulk",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BulkAccepted,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": body_schema(BulkOnboardRequest)},
                "text/csv": {"schema": {"type": "string"}},
            },
            "required": True,
        }
    },
)
async def bulk_onboard(request: Request, state: State, claims: Writer, response: Response) -> BulkAccepted:
    """Onboard up to 10,000 devices (JSON `{devices: [...]}` or CSV) in one BulkOnboarding run."""
    raw = await request.body()
    if len(raw) > BULK_MAX_BODY_BYTES:
        raise invalid(["body"], f"must be at most {BULK_MAX_BODY_BYTES} bytes")
    if request.headers.get("content-type", "").startswith("text/csv"):
        payload: Any = {"devices": _csv_devices(raw)}
    else:
        try:
            payload = json.loads(raw)
        except ValueError:
            raise invalid(["body"], "is not valid JSON") from None
        except RecursionError:  # 8 MiB of brackets: the parser's recursion, not a 500
            raise invalid(["body"], "is nested too deeply") from None
    try:
        body = BulkOnboardRequest.model_validate(payload)
    except ValidationError as exc:
        raise invalid(["body", *exc.errors()[0]["loc"]], exc.errors()[0]["msg"]) from None
    except RecursionError:  # metadata nested past what its size check can serialise
        raise invalid(["body"], "is nested too deeply") from None
    seen: set[str] = set()
    checked: set[str] = set()  # (type, config) pairs: the same config of many devices is checked once
    with config_schema.step_budget(BULK_VALIDATION_STEPS):
        for i, spec in enumerate(body.devices):
            if spec.device_id in seen:
                raise invalid(["body", "devices", i, "device_id"], f"{spec.device_id!r} appears twice")
            seen.add(spec.device_id)
            pair = _fingerprint([spec.device_type, spec.config])
            if pair not in checked:
                await _check_config(state, claims.tenant, spec, ["body", "devices", i])
                checked.add(pair)
    registered = await device_facade.count_registered(state.pool, claims.tenant, sorted(seen))
    await state.quotas.check_count(claims.tenant, "max_devices", len(seen) - registered)
    devices = [d.model_dump(mode="json") for d in body.devices]
    bulk_id = _fingerprint([claims.tenant, devices])[:20]
    wid = bulk_workflow_id(claims.tenant, bulk_id)
    await claim_checks.store(state.pool, bulk_id, claims.tenant, "bulk-onboarding", devices)
    try:
        await state.temporal.start_workflow(
            BulkOnboarding.run,
            BulkOnboardingInput(
                tenant=claims.tenant,
                actor=actor_of(claims),
                bulk_id=bulk_id,
                claim_id=bulk_id,
                total=len(devices),
            ),
            id=wid,
            task_queue=TaskQueue.ORCHESTRATION.value,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            search_attributes=device_search_attributes(claims.tenant, "bulk-onboarding"),
        )
        existing = False
    except WorkflowAlreadyStartedError:
        existing = True
        response.status_code = status.HTTP_200_OK
    return BulkAccepted(
        bulk_id=bulk_id,
        workflow_id=wid,
        total=len(devices),
        status_url=f"/v1/bulk-onboardings/{bulk_id}",
        temporal_ui_url=state.ui_url(wid),
        existing=existing,
    )


@router.get("/v1/device-types", response_model=list[DeviceTypeView])
async def device_types(state: State, claims: Reader) -> list[DeviceTypeView]:
    """The tenant's device types (its own and the built-in ones) with their configuration schema."""
    return await state.devices.device_types(claims.tenant)


@router.put("/v1/device-types/{name}", response_model=DeviceTypeView)
async def put_device_type(name: str, body: DeviceTypeBody, state: State, claims: Admin) -> DeviceTypeView:
    """Create or replace the tenant's own device type (admin; a built-in one of the same name is
    hidden for this tenant only). `config_schema` is JSON Schema Draft 2020-12 (at most 32 KiB,
    self-contained, RE2 patterns); the default config must pass it and the twin's document limits."""
    if body.name != name:
        raise invalid(["body", "name"], "must match the name in the path")
    try:
        config_schema.check_schema(body.config_schema)
    except config_schema.SchemaProblem as exc:
        raise invalid(["body", "config_schema", *exc.loc], exc.reason) from None
    breach = document_breach(body.default_config, "default_config")
    if breach is not None:
        raise invalid(["body", "default_config"], breach.reason)
    try:
        config_schema.validate(body.default_config, body.config_schema, "default_config")
    except config_schema.ConfigError as exc:
        raise invalid(["body", *exc.loc], exc.reason) from None
    device_type = as_contract(body, DeviceTypeView)
    await state.devices.put_device_type(claims.tenant, device_type)
    return device_type


__all__ = ["MAX_BULK_DEVICES", "router"]
