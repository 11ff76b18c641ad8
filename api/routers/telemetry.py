"""Telemetry: ingest (durable before 202), read back, quarantine, rules and alerts."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, status
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities import analytics_facade, data_facade
from activities.telemetry_accept import (
    Accepted,
    ConflictingBatch,
    ReadingColumns,
    StorageUnavailable,
    accept_batch,
)
from api import export_slots
from api.auth import Bearer, State, require
from api.export_slots import EXPORTS
from api.models.base import as_contract
from api.models.telemetry import AlertActionBody, RuleBody, TelemetryAccepted, TelemetryBatch
from api.openapi import body_schema
from api.problems import conflict, invalid, not_found
from api.revocations import verified_token
from api.state import AppState
from api.telemetry_body import first_errors, parse_batch
from api.workflow_wait import result_within
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.limits import (
    DEVICE_ID_MAX_CHARS,
    FUTURE_TOLERANCE_S,
    MAX_AGE_DAYS,
    MAX_BATCH_BYTES,
    NAME_MAX_CHARS,
)
from fleetflow.contracts.telemetry import (
    SEVERITIES,
    AlertAction,
    AlertView,
    QuarantinedBatch,
    QuarantineView,
    Rule,
    TelemetryPoint,
    TelemetrySeries,
)
from fleetflow.security import AuthError, TokenClaims, verify_device_credential
from workflows.alert_lifecycle import AlertLifecycle, alert_action_id

router = APIRouter(tags=["telemetry"])
Reader = Annotated[TokenClaims, Depends(require("telemetry:read"))]
RuleWriter = Annotated[TokenClaims, Depends(require("rules:write"))]
AlertWriter = Annotated[TokenClaims, Depends(require("alerts:write"))]
MAX_ERRORS = 50
BUCKET_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


async def _sender(
    request: Request, state: AppState, credentials: HTTPAuthorizationCredentials | None
) -> tuple[str, str | None, str]:
    """(tenant, device id, writer): a device credential may send for itself only, an operator
    for any device. The writer names the batch ids' owner: `device:<id>` for a device
    credential, `token:<subject>` for an API token. 429 over the request rates."""
    if credentials is None or not credentials.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", {"WWW-Authenticate": "Bearer"}
        )
    token = credentials.credentials
    ring, issuer = state.keys, state.settings.jwt_issuer
    try:
        claims = verified_token(request.scope, ring, token, issuer)
    except AuthError as api_error:
        try:
            device = verify_device_credential(ring, token, issuer)
        except AuthError:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, str(api_error), {"WWW-Authenticate": "Bearer"}
            ) from None
        if not await state.credentials.active(device.tenant, device.device_id, device.jti, token):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "credential revoked or unknown", {"WWW-Authenticate": "Bearer"}
            ) from None
        await state.quotas.admit_request(device.tenant, device.device_id)
        return device.tenant, device.device_id, f"device:{device.device_id}"
    if "telemetry:write" not in claims.scopes and "admin" not in claims.scopes:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs the 'telemetry:write' scope")
    await state.quotas.admit_request(claims.tenant)
    return claims.tenant, None, f"token:{claims.subject}"


def _problems(exc: ValidationError) -> HTTPException:
    errors = [
        {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in first_errors(exc, MAX_ERRORS)
    ]
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=errors)


@router.post(
    "/v1/telemetry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TelemetryAccepted,
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": body_schema(TelemetryBatch)}},
            "required": True,
        }
    },
)
async def ingest(request: Request, state: State, credentials: Bearer) -> TelemetryAccepted:
    """Accept a batch once it is durable; a repeated `batch_id` is acknowledged and stored once.

    A batch id belongs to its sender (the device of a device credential, else the API token's
    subject): the same id with the same readings again is `duplicate`, with other readings 409.
    Limits: at most 10,000 readings and 2 MiB a batch; timestamps at most 366 days old and
    5 minutes ahead; |value| at most 1e100; the tenant's and each device's readings/s and
    requests/s (429 with Retry-After).
    """
    tenant, device_id, writer = await _sender(request, state, credentials)
    raw = await request.body()
    if len(raw) > MAX_BATCH_BYTES:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"a batch is at most {MAX_BATCH_BYTES} bytes")
    try:
        batch = parse_batch(raw)  # columns, no object per reading (api/telemetry_body.py)
    except ValidationError as exc:
        raise _problems(exc) from None
    latest = datetime.now(UTC) + timedelta(seconds=FUTURE_TOLERANCE_S)
    oldest = latest - timedelta(days=MAX_AGE_DAYS, seconds=FUTURE_TOLERANCE_S)
    devices = Counter(batch.device_ids)
    foreign = device_id is not None and (len(devices) > 1 or device_id not in devices)
    if max(batch.ts) > latest or min(batch.ts) < oldest or foreign:
        errors = _reading_errors(batch, device_id, latest, oldest)
        # 403 for another device's reading anywhere in the batch, also past the errors shown
        raise HTTPException(403 if foreign else 422, detail=errors[:MAX_ERRORS])
    await state.quotas.admit_readings(tenant, devices)  # 429 over the tenant's or a device's rate
    # a reading crossing a threshold raises its alert now, not in its window: the check's reads
    # go beside the accept, its starts once the batch is durable
    planning = state.early_alerts.begin(tenant, batch)
    try:
        accepted = await _accept(state, tenant, writer, batch, devices)
    except BaseException:
        state.early_alerts.abandon(planning)
        raise
    if accepted.duplicate:
        state.early_alerts.abandon(planning)
    else:
        await state.early_alerts.finish(planning, writer.removeprefix("token:"))
    return TelemetryAccepted(
        batch_id=batch.batch_id, readings=accepted.readings, duplicate=accepted.duplicate
    )


async def _accept(
    state: AppState, tenant: str, writer: str, batch: ReadingColumns, devices: Counter[str]
) -> Accepted:
    """The data service's accept path: durable before the 202; 503 or 409 when it is not."""
    try:
        return await accept_batch(state.pool, tenant, writer, batch, devices)
    except StorageUnavailable as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"storage unavailable, nothing was accepted: {exc}",
            {"Retry-After": "1"},
        ) from None
    except ConflictingBatch:
        # an id reused for other readings: dropping them silently would lose data
        raise conflict(
            f"batch_id {batch.batch_id!r} was already accepted from this sender with other "
            "readings; send new readings under a new batch_id"
        ) from None


def _reading_errors(
    batch: ReadingColumns, device_id: str | None, latest: datetime, oldest: datetime
) -> list[dict[str, Any]]:
    """The readings' errors: ts out of bounds, another device's reading under a device credential."""
    errors: list[dict[str, Any]] = []
    for i, (ts, sender) in enumerate(zip(batch.ts, batch.device_ids, strict=True)):
        if ts > latest:
            errors.append(
                {
                    "loc": ["body", "readings", i, "ts"],
                    "msg": "more than 5 minutes in the future",
                    "type": "value_error",
                }
            )
        elif ts < oldest:
            too_old = f"more than {MAX_AGE_DAYS} days old (oldest: {oldest.isoformat()})"
            errors.append({"loc": ["body", "readings", i, "ts"], "msg": too_old, "type": "value_error"})
        if device_id is not None and sender != device_id:
            errors.append(
                {
                    "loc": ["body", "readings", i, "device_id"],
                    "msg": "a device credential may only send its own readings",
                    "type": "value_error",
                }
            )
        if len(errors) >= MAX_ERRORS:
            break
    return errors


@router.get("/v1/devices/{device_id}/telemetry", response_model=TelemetrySeries)
async def read_telemetry(
    device_id: str,
    state: State,
    claims: Reader,
    metric: Annotated[str | None, Query(max_length=NAME_MAX_CHARS)] = None,
    from_: Annotated[datetime | None, Query(alias="from")] = None,
    to: Annotated[datetime | None, Query()] = None,
    bucket: Annotated[
        str | None, Query(pattern=r"^[1-9][0-9]{0,3}[smhd]$", description="e.g. 10s, 5m, 1h")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> TelemetrySeries:
    """Raw readings, or min/max/avg/count per time bucket, oldest first."""
    if await state.devices.get_device(claims.tenant, device_id) is None:
        raise not_found(f"device {device_id!r}")
    for name, value in (("from", from_), ("to", to)):
        if value is not None and value.tzinfo is None:
            raise invalid(["query", name], "needs a time zone (e.g. Z)")
    interval = None if bucket is None else timedelta(**{BUCKET_UNITS[bucket[-1]]: int(bucket[:-1])})
    rows = await data_facade.readings(
        state.pool, claims.tenant, device_id, metric=metric, from_=from_, to=to, limit=limit, bucket=interval
    )
    if bucket is None:
        points = [TelemetryPoint(ts=r["ts"], metric=r["metric"], value=r["value"]) for r in rows]
    else:
        points = [TelemetryPoint(**r) for r in rows]
    return TelemetrySeries(device_id=device_id, bucket=bucket, points=points)


EXPORT_TYPES = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}
EXPORT_CHUNK = 500  # rows per chunk written to the response


@router.get(
    "/v1/devices/{device_id}/telemetry/export",
    response_class=StreamingResponse,
    responses={200: {"content": {t: {} for t in EXPORT_TYPES.values()}}},
)
async def export_telemetry(
    device_id: str,
    state: State,
    claims: Reader,
    from_: Annotated[datetime | None, Query(alias="from")] = None,
    to: Annotated[datetime | None, Query()] = None,
    format: Annotated[str, Query(pattern="^(csv|ndjson)$")] = "csv",
) -> StreamingResponse:
    """A device's raw readings (ts, metric, value) over [from, to), oldest first, streamed from
    a server-side cursor (any length, constant memory); only the caller's tenant's devices."""
    if await state.devices.get_device(claims.tenant, device_id) is None:
        raise not_found(f"device {device_id!r}")
    for name, value in (("from", from_), ("to", to)):
        if value is not None and value.tzinfo is None:
            raise invalid(["query", name], "needs a time zone (e.g. Z)")
    tenant = claims.tenant
    slot = EXPORTS.take(tenant)  # 429 when the tenant's (or this process's) exports are all running

    async def body() -> AsyncIterator[bytes]:
        deadline = time.monotonic() + export_slots.DEADLINE_S
        with EXPORTS.held(tenant, slot):
            async for chunk in _export_rows(state, tenant, device_id, from_, to, format, deadline):
                yield chunk

    filename = f"{device_id}.{format}"
    return StreamingResponse(
        body(),
        media_type=EXPORT_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


async def _export_rows(
    state: AppState,
    tenant: str,
    device_id: str,
    from_: datetime | None,
    to: datetime | None,
    format: str,
    deadline: float,
) -> AsyncIterator[bytes]:
    async with state.pool.acquire() as conn, conn.transaction(readonly=True):
        if format == "csv":
            yield b"ts,metric,value\n"
        chunk: list[str] = []
        rows = data_facade.export_readings(conn, tenant, device_id, from_, to, idle_s=export_slots.IDLE_S)
        async for r in rows:
            ts = r["ts"].isoformat()
            if format == "csv":
                chunk.append(f"{ts},{_csv_field(r['metric'])},{r['value']!r}\n")
            else:
                chunk.append(json.dumps({"ts": ts, "metric": r["metric"], "value": r["value"]}) + "\n")
            if len(chunk) >= EXPORT_CHUNK:
                if time.monotonic() > deadline:
                    # cut off: the response ends unfinished, which the client sees as an error
                    raise ExportCutOff(f"export of {device_id} passed {export_slots.DEADLINE_S:g} s")
                yield "".join(chunk).encode()
                chunk = []
        if chunk:
            yield "".join(chunk).encode()


class ExportCutOff(Exception):
    """An export ran past its deadline (its client reads too slowly, or the range is too large)."""


def _csv_field(text: str) -> str:
    """A CSV field, quoted when it holds a separator, a quote or a line break."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


@router.get("/v1/telemetry/quarantine", response_model=list[QuarantineView])
async def quarantine(
    state: State,
    claims: Reader,
    device_id: Annotated[str | None, Query(max_length=DEVICE_ID_MAX_CHARS)] = None,
) -> list[QuarantineView]:
    """Readings kept aside because their device may not send (unknown, pending, decommissioned)."""
    rows = await data_facade.quarantined_readings(state.pool, claims.tenant, device_id)
    return [QuarantineView(**r) for r in rows]


@router.get("/v1/telemetry/quarantined-batches", response_model=list[QuarantinedBatch])
async def quarantined_batches(state: State, claims: Reader) -> list[QuarantinedBatch]:
    """Batches set aside because checking or storing them failed the same way on every retry
    (poison pills), newest first, with the error as the reason; their payload is kept."""
    rows = await data_facade.quarantined_batches(state.pool, claims.tenant)
    return [QuarantinedBatch(**r) for r in rows]


@router.put("/v1/rules/{rule_id}", response_model=Rule)
async def put_rule(rule_id: str, body: RuleBody, state: State, claims: RuleWriter) -> Rule:
    """Create or replace an analytics rule of the caller's tenant."""
    rule = as_contract(body, Rule)
    if rule.rule_id != rule_id:
        raise invalid(["body", "rule_id"], "must match the id in the path")
    async with state.quotas.count_lock(claims.tenant, "max_rules"):
        if not await analytics_facade.rule_exists(state.pool, claims.tenant, rule_id):
            await state.quotas.check_count(claims.tenant, "max_rules")  # 403 at the rule quota
        await state.analytics.put_rule(claims.tenant, rule)
    state.early_alerts.forget(claims.tenant)  # this process's accepts see the rule at once
    return rule


@router.get("/v1/rules", response_model=list[Rule])
async def list_rules(state: State, claims: Reader) -> list[Rule]:
    """The tenant's analytics rules."""
    return await state.analytics.list_rules(claims.tenant)


@router.delete("/v1/rules/{rule_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_rule(rule_id: str, state: State, claims: RuleWriter) -> None:
    """Remove a rule; its open alerts stay until cleared by hand."""
    if not await state.analytics.delete_rule(claims.tenant, rule_id):
        raise not_found(f"rule {rule_id!r}")
    state.early_alerts.forget(claims.tenant)


@router.get("/v1/alerts", response_model=list[AlertView])
async def alerts(
    state: State,
    claims: Reader,
    status_: Annotated[
        str | None, Query(alias="status", pattern="^(open|acknowledged|cleared|active)$")
    ] = None,
    severity: Annotated[str | None, Query(pattern=f"^({'|'.join(SEVERITIES)})$")] = None,
    device_id: Annotated[str | None, Query(max_length=DEVICE_ID_MAX_CHARS)] = None,
    before: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="page on: alerts older than this alert_id")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AlertView]:
    """Alerts, newest first, by status (`open`: raised and not acknowledged yet, what the
    `fleetflow_alerts_open` gauge and the status screen count; `acknowledged`; `active`: either
    of them, still holding; `cleared`), severity and device; the next page is
    `?before=<the last alert_id>`."""
    return await state.analytics.list_alerts(
        claims.tenant, status=status_, device_id=device_id, limit=limit, severity=severity, before=before
    )


AlertId = Annotated[int, Path(ge=1, le=2**63 - 1)]


async def _act(
    state: AppState, claims: TokenClaims, alert_id: int, action: str, body: AlertActionBody | None
) -> AlertView:
    """Run AlertLifecycle for one action and answer its outcome (404, 409 or the alert)."""
    request = AlertAction(
        tenant=claims.tenant,
        alert_id=alert_id,
        action="acknowledge" if action == "acknowledge" else "clear",
        actor=claims.subject,
        comment=None if body is None else body.comment,
    )
    try:
        handle = await state.temporal.start_workflow(
            AlertLifecycle.run,
            request,
            id=alert_action_id(claims.tenant, alert_id, action),
            task_queue=TaskQueue.ORCHESTRATION.value,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        )
    except WorkflowAlreadyStartedError:
        raise conflict(f"alert {alert_id} is being {action}d right now") from None
    acted = await result_within(handle, state.settings.workflow_wait_s, f"{action} of alert {alert_id}")
    if acted.outcome == "not_found":
        raise not_found(f"alert {alert_id}")
    if acted.outcome == "conflict" or acted.alert is None:
        raise conflict(acted.reason)
    return acted.alert


@router.post("/v1/alerts/{alert_id}/acknowledge", response_model=AlertView)
async def acknowledge_alert(
    alert_id: AlertId, state: State, claims: AlertWriter, body: AlertActionBody | None = None
) -> AlertView:
    """Acknowledge an active alert (who, when, an optional comment): it stays the one alert of its
    device and rule, and the rule still clears it; records `AlertAcknowledged`. 409 when it is
    acknowledged or cleared already."""
    return await _act(state, claims, alert_id, "acknowledge", body)


@router.post("/v1/alerts/{alert_id}/clear", response_model=AlertView)
async def clear_alert(
    alert_id: AlertId, state: State, claims: AlertWriter, body: AlertActionBody | None = None
) -> AlertView:
    """Clear an alert by hand (who, when, an optional comment); records `AlertCleared`. If the
    rule's condition still holds, its next window raises a new alert (ThingsBoard's lifecycle).
    409 when it is cleared already."""
    return await _act(state, claims, alert_id, "clear", body)
