"""`make record-histories`: run every workflow type through its scenarios on a fresh stack and
save the histories under tests/replay/histories/, for the replay test.

Recording again adds files (`name-2.json`, ...) and never replaces one: the code must
keep replaying every history it ever produced. A failing replay means the change would
break runs in flight: guard it with `workflow.patched`, never delete the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from temporalio.client import (
    ScheduleActionExecutionStartWorkflow,
    WithStartWorkflowOperation,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import WorkflowIDConflictPolicy

from bench.stack import Stack, say, stack
from fleetflow.contracts.common import Actor, TaskQueue, tenant_scoped_id
from fleetflow.contracts.rollouts import (
    RolloutDecision,
    RolloutInput,
    RolloutPolicy,
    RolloutRequest,
    RolloutTarget,
)
from fleetflow.temporal import device_search_attributes
from tests.replay.keys import REPLAY_PAYLOAD_KEYS
from workflows.firmware_rollout import rollout_id

HISTORIES = Path(__file__).parent / "histories"
Scenario = Callable[[Stack], Awaitable[WorkflowHandle[Any, Any]]]


async def _progress(s: Stack, device_id: str, status: str) -> dict[str, Any]:
    for _ in range(300):
        body: dict[str, Any] = (await s.api.get(f"/v1/onboardings/{device_id}", headers=s.headers)).json()
        if body.get("status") == status:
            return body
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{device_id} never reached {status}")


async def onboarding_completed(s: Stack) -> WorkflowHandle[Any, Any]:
    device_id = f"rec-{uuid.uuid4().hex[:8]}"
    body = {"device_id": device_id, "device_type": "thermostat", "tags": ["rec"]}
    accepted = (await s.api.post("/v1/devices", json=body, headers=s.headers)).json()
    waiting = await _progress(s, device_id, "awaiting_first_contact")
    auth = {"Authorization": f"Bearer {waiting['credential']}"}
    await s.api.post("/v1/device-contact", json={"firmware_version": "1.0.1"}, headers=auth)
    await _progress(s, device_id, "completed")
    return s.client.get_workflow_handle(accepted["workflow_id"])


async def device_twin(s: Stack) -> WorkflowHandle[Any, Any]:
    """A twin that takes desired changes, reports, continues as new once, and ends."""
    onboarding = await onboarding_completed(s)
    device_id = onboarding.id.removeprefix("onboard-bench-")
    handle = s.client.get_workflow_handle(f"twin-bench-{device_id}")
    for version in range(2, 40):
        url = f"/v1/devices/{device_id}/twin/desired"
        await s.api.patch(url, json={"target_c": 10 + version % 20}, headers=s.headers)
        if version % 10 == 0:
            report = {"patch": {"target_c": 10 + version % 20}, "at": "2026-01-01T00:00:00Z"}
            await handle.signal("report", report)
        if version == 25:  # a new firmware version reported: the ReportedFirmware attribute follows
            report = {"patch": {"firmware_version": "2.0.0"}, "at": "2026-01-01T00:00:00Z"}
            await handle.signal("report", report)
    await handle.signal("end", {"reason": "recorded", "actor": "bench"})
    await handle.result()
    return handle


async def device_twin_waits(s: Stack) -> WorkflowHandle[Any, Any]:
    """A twin run that holds the device's long-polls (answered by a change, by the timeout, and
    released when the device hangs up), refuses an oversize patch, and continues as new."""
    device_id = f"rec-{uuid.uuid4().hex[:8]}"
    body = {"device_id": device_id, "device_type": "sensor"}
    await s.api.post("/v1/devices", json=body, headers=s.headers)
    waiting = await _progress(s, device_id, "awaiting_first_contact")
    auth = {"Authorization": f"Bearer {waiting['credential']}"}
    await s.api.post("/v1/device-contact", json={"firmware_version": "1.0.1"}, headers=auth)
    await _progress(s, device_id, "completed")
    wid = f"twin-bench-{device_id}"
    await s.client.get_workflow_handle(wid).terminate("recording: a small history limit")
    config = {"report_interval_s": 10}
    first = await s.client.start_workflow(
        "DeviceTwin",
        {
            "tenant": "bench",
            "device_id": device_id,
            "config_schema": {},
            "initial_desired": config,
            "initial_reported": config,
            "history_limit": 50,
        },
        id=wid,
        task_queue="orchestration",
        search_attributes=device_search_attributes("bench", "twin", device_id),
    )
    poll = asyncio.create_task(s.api.get("/v1/device/twin/delta", params={"wait": 30}, headers=auth))
    await asyncio.sleep(1)
    url = f"/v1/devices/{device_id}/twin/desired"
    await s.api.patch(url, json={"report_interval_s": 20}, headers=s.headers)
    await poll
    await s.api.post("/v1/device/twin/reported", json={"reported": {"report_interval_s": 20}}, headers=auth)
    await s.api.get("/v1/device/twin/delta", params={"wait": 1}, headers=auth)  # ends at its timeout
    hung_up = asyncio.create_task(s.api.get("/v1/device/twin/delta", params={"wait": 30}, headers=auth))
    await asyncio.sleep(1)
    hung_up.cancel()  # the device hangs up: the API releases its wait (signal release_wait)
    await asyncio.sleep(1)
    await s.api.patch(url, json={"blob": "x" * 70_000}, headers=s.headers)  # refused: 413
    for rssi in range(60):
        await s.api.post("/v1/device/twin/reported", json={"reported": {"rssi": -rssi}}, headers=auth)
        if (await s.client.get_workflow_handle(wid).describe()).run_id != first.first_execution_run_id:
            break
    return s.client.get_workflow_handle(wid, run_id=first.first_execution_run_id)


async def _put_hot_rule(s: Stack) -> None:
    """The rule the ingestion scenarios' readings raise an alert on (t above 30)."""
    rule = {
        "rule_id": "rec-hot",
        "device_type": "thermostat",
        "metric": "t",
        "kind": "threshold",
        "params": {"above": 30},
    }
    await s.api.put("/v1/rules/rec-hot", json=rule, headers=s.headers)


async def telemetry_ingestion(s: Stack) -> WorkflowHandle[Any, Any]:
    """A shard that stores a window (with a quarantined device) and raises an alert."""
    onboarding = await onboarding_completed(s)
    device_id = onboarding.id.removeprefix("onboard-bench-")
    await _put_hot_rule(s)
    now = datetime.now(UTC)
    rows = [
        {"device_id": d, "ts": now.isoformat(), "metric": "t", "value": v}
        for d, v in ((device_id, 20.0), (device_id, 35.0), ("rec-ghost", 1.0))
    ]
    await s.api.post("/v1/telemetry", json={"batch_id": "rec-1", "readings": rows}, headers=s.headers)
    for _ in range(300):
        alerts = (await s.api.get("/v1/alerts", headers=s.headers)).json()
        if alerts:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)  # let the window's events be recorded
    runs = [w async for w in s.client.list_workflows("WorkflowType = 'TelemetryIngestion'")]
    handles = [s.client.get_workflow_handle(r.id, run_id=r.run_id) for r in runs]
    for handle in handles:
        progress = await handle.query("progress")
        if progress and progress["windows"]:
            return handle
    raise RuntimeError("no ingestion window was processed")


async def telemetry_ingestion_ready(s: Stack) -> WorkflowHandle[Any, Any]:
    """A shard whose window holds only active devices (its claim says so: no device check)
    and a watched reading (the window goes at once) that raises an alert."""
    onboarding = await onboarding_completed(s)
    device_id = onboarding.id.removeprefix("onboard-bench-")
    await _put_hot_rule(s)
    now = datetime.now(UTC)
    rows = [{"device_id": device_id, "ts": now.isoformat(), "metric": "t", "value": v} for v in (20.0, 35.0)]
    await s.api.post("/v1/telemetry", json={"batch_id": "rec-ready", "readings": rows}, headers=s.headers)
    for _ in range(300):
        if (await s.api.get("/v1/alerts", params={"device_id": device_id}, headers=s.headers)).json():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)  # let the window's events be recorded
    runs = [w async for w in s.client.list_workflows("WorkflowType = 'TelemetryIngestion'")]
    for run in runs:
        handle = s.client.get_workflow_handle(run.id, run_id=run.run_id)
        progress = await handle.query("progress")
        if progress and progress["windows"]:
            return handle
    raise RuntimeError("no ingestion window was processed")


async def telemetry_poison(s: Stack) -> WorkflowHandle[Any, Any]:
    """A shard that splits a window around a batch COPY cannot read, quarantines that batch
    and stores the others (the batches are written as an older API acknowledged them)."""
    conn = await asyncpg.connect(s.settings.database_url)
    try:
        now = datetime.now(UTC).isoformat()
        for n, value in enumerate(("1.0", "not-a-number", "2.0")):
            payload = f"bench,rec-p{n},rec-ghost-p,t,{now},{value}\n".encode()
            await conn.execute(
                """INSERT INTO data.ingest_batches (tenant, batch_id, bucket, readings, device_ids, payload)
                   VALUES ('bench', $1, 0, 1, ARRAY['rec-ghost-p'], $2)""",
                f"rec-p{n}",
                payload,
            )
        for _ in range(600):
            statuses = await conn.fetch("SELECT status FROM data.ingest_batches WHERE batch_id LIKE 'rec-p%'")
            if {r["status"] for r in statuses} <= {"stored", "quarantined"}:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the poison batch was never isolated")
    finally:
        await conn.close()
    await asyncio.sleep(1)  # let the window's events be recorded
    handle = s.client.get_workflow_handle("ingest-0")
    progress = await handle.query("progress")
    if not progress or not progress.get("batches_quarantined"):
        raise RuntimeError(f"ingest-0 quarantined nothing: {progress}")
    return s.client.get_workflow_handle("ingest-0", run_id=(await handle.describe()).run_id)


async def ingestion_supervisor(s: Stack) -> WorkflowHandle[Any, Any]:
    """The supervisor restarts a terminated shard and finishes a window its dead run stored."""
    shard = s.client.get_workflow_handle("ingest-1")
    dead = (await shard.describe()).run_id
    await shard.terminate("recording: a shard dies")
    conn = await asyncpg.connect(s.settings.database_url)
    try:
        await conn.execute(
            """INSERT INTO data.windows (window_id, stored, quarantined, by_tenant)
               VALUES ($1, 0, 0, '{"bench": {"stored": 0, "quarantined": 0}}')""",
            f"ingest-1/{dead}/0",
        )
    finally:
        await conn.close()
    for _ in range(600):
        described = await shard.describe()
        if described.run_id != dead:
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the supervisor did not restart ingest-1")
    for _ in range(600):
        check = await s.client.get_workflow_handle("ingest-supervisor").query("last_check")
        if check and check.get("orphans"):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(2)  # let it finish the orphan
    supervisor = s.client.get_workflow_handle("ingest-supervisor")
    return s.client.get_workflow_handle("ingest-supervisor", run_id=(await supervisor.describe()).run_id)


async def _sensors(s: Stack, count: int) -> dict[str, str]:
    devices = [
        {"device_id": f"rec-fw-{uuid.uuid4().hex[:6]}-{i}", "device_type": "sensor"} for i in range(count)
    ]
    bulk = (await s.api.post("/v1/devices:bulk", json={"devices": devices}, headers=s.headers)).json()
    await s.client.get_workflow_handle(bulk["workflow_id"]).result()
    text = (await s.api.get(f"/v1/bulk-onboardings/{bulk['bulk_id']}/credentials", headers=s.headers)).text
    return {r["device_id"]: r["credential"] for r in csv.DictReader(io.StringIO(text))}


async def firmware_rollout(s: Stack) -> WorkflowHandle[Any, Any]:
    """A campaign of four devices: one fails, the campaign aborts and rolls the others back."""
    creds = await _sensors(s, 4)
    version = f"9.{uuid.uuid4().int % 10000}"
    await s.api.post(
        "/v1/firmware",
        params={"device_type": "sensor", "version": version},
        content=b"fw",
        headers={**s.headers, "Content-Type": "application/octet-stream"},
    )
    campaign = f"rec-{uuid.uuid4().hex[:6]}"
    policy = {"canary": 4, "abort_failure_percent": 20, "abort_min_finished": 4}
    target = {"device_ids": list(creds)}
    body = {"campaign_id": campaign, "firmware_id": f"sensor-{version}", "target": target, "policy": policy}
    started = (await s.api.post("/v1/rollouts", json=body, headers=s.headers)).json()
    handle = s.client.get_workflow_handle(started["workflow_id"])
    first = sorted(creds)[0]
    for _ in range(400):
        for device_id, credential in creds.items():
            auth = {"Authorization": f"Bearer {credential}"}
            job = await s.api.get("/v1/device/jobs", headers=auth)
            if job.status_code == 200:
                kind = job.json()["kind"]
                state = "failed" if device_id == first and kind == "update" else "succeeded"
                url = f"/v1/device/jobs/{campaign}/progress"
                await s.api.post(url, json={"kind": kind, "state": state}, headers=auth)
        progress = (await s.api.get(f"/v1/rollouts/{campaign}", headers=s.headers)).json()
        if progress["status"] in ("completed", "aborted", "cancelled"):
            await handle.result()
            return handle
        await asyncio.sleep(0.05)
    raise RuntimeError("the campaign did not end")


async def firmware_rollout_cancelled(s: Stack) -> WorkflowHandle[Any, Any]:
    """A campaign paused across continue-as-new (a lowered history limit), resumed, then
    cancelled while a device installs; its late success is followed and rolled back."""
    creds = await _sensors(s, 3)
    version = f"9.{uuid.uuid4().int % 10000}"
    await s.api.post(
        "/v1/firmware",
        params={"device_type": "sensor", "version": version},
        content=b"fw",
        headers={**s.headers, "Content-Type": "application/octet-stream"},
    )
    campaign = f"rec-{uuid.uuid4().hex[:6]}"
    request = RolloutRequest(
        campaign_id=campaign,
        firmware_id=f"sensor-{version}",
        target=RolloutTarget(device_ids=list(creds)),
        policy=RolloutPolicy(canary=3, rate_per_minute=60_000),
    )
    actor = Actor(subject="recorder", tenant="bench", scopes=["rollouts:admin"])
    wid = rollout_id("bench", campaign)
    await s.client.start_workflow(
        "FirmwareRollout",
        RolloutInput(tenant="bench", actor=actor, request=request, history_limit=40),
        id=wid,
        task_queue=TaskQueue.ORCHESTRATION.value,
    )
    late = sorted(creds)[0]
    auth = {"Authorization": f"Bearer {creds[late]}"}
    url = f"/v1/device/jobs/{campaign}/progress"

    async def offered(kind: str) -> None:
        for _ in range(600):
            job = await s.api.get("/v1/device/jobs", headers=auth)
            if job.status_code == 200 and job.json()["kind"] == kind:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{late} was offered no {kind} job")

    async def status(wanted: str) -> None:
        for _ in range(600):
            body = (await s.api.get(f"/v1/rollouts/{campaign}", headers=s.headers)).json()
            if body["status"] == wanted:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the campaign never became {wanted}")

    await offered("update")
    for state in ("downloading", "installing"):
        await s.api.post(url, json={"kind": "update", "state": state}, headers=auth)
    await s.api.post(f"/v1/rollouts/{campaign}/pause", headers=s.headers)
    for _ in range(600):  # paused through two continue-as-new
        if len([r async for r in s.client.list_workflows(f"WorkflowId = '{wid}'")]) >= 3:
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the paused campaign did not continue as new")
    await status("paused")
    await s.api.post(f"/v1/rollouts/{campaign}/resume", headers=s.headers)
    await s.api.post(f"/v1/rollouts/{campaign}/cancel", json={"reason": "recorded"}, headers=s.headers)
    await status("rolling_back")
    await s.api.post(url, json={"kind": "update", "state": "succeeded"}, headers=auth)
    await offered("rollback")
    await s.api.post(url, json={"kind": "rollback", "state": "succeeded"}, headers=auth)
    handle = s.client.get_workflow_handle(wid)
    await handle.result()
    return handle


async def firmware_rollout_cancelled_at_start(s: Stack) -> WorkflowHandle[Any, Any]:
    """A campaign cancelled in its first workflow task (update-with-start), before its plan
    finds no device to update: the accepted cancel is honoured after the (empty) last wave."""
    version = f"9.{uuid.uuid4().int % 10000}"
    await s.api.post(
        "/v1/firmware",
        params={"device_type": "sensor", "version": version},
        content=b"fw",
        headers={**s.headers, "Content-Type": "application/octet-stream"},
    )
    campaign = f"rec-{uuid.uuid4().hex[:6]}"
    request = RolloutRequest(
        campaign_id=campaign,
        firmware_id=f"sensor-{version}",
        target=RolloutTarget(tags=["no-such-tag"]),
    )
    actor = Actor(subject="bench", tenant="bench", scopes=["rollouts:admin"])  # the identity's own
    wid = rollout_id("bench", campaign)
    start: WithStartWorkflowOperation[Any, Any] = WithStartWorkflowOperation(
        "FirmwareRollout",
        RolloutInput(tenant="bench", actor=actor, request=request),
        id=wid,
        task_queue=TaskQueue.ORCHESTRATION.value,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
    )
    await s.client.execute_update_with_start_workflow(
        "cancel", RolloutDecision(actor=actor, reason="recorded"), start_workflow_operation=start
    )
    handle = await start.workflow_handle()
    result = await handle.result()
    if result["status"] != "cancelled":
        raise RuntimeError(f"the campaign ended {result['status']}")
    return handle


async def device_decommission(s: Stack) -> WorkflowHandle[Any, Any]:
    """A sensor retired with its telemetry archived."""
    device_id = next(iter(await _sensors(s, 1)))
    started = (await s.api.post(f"/v1/devices/{device_id}:decommission", json={}, headers=s.headers)).json()
    handle = s.client.get_workflow_handle(started["workflow_id"])
    await handle.result()
    return handle


async def onboarding_rejected(s: Stack) -> WorkflowHandle[Any, Any]:
    device_id = f"rec-{uuid.uuid4().hex[:8]}"
    body = {"device_id": device_id, "device_type": "gateway", "config": {"site": "rec"}}
    accepted = (await s.api.post("/v1/devices", json=body, headers=s.headers)).json()
    await _progress(s, device_id, "awaiting_approval")
    await s.api.post(f"/v1/onboardings/{device_id}/reject", json={"reason": "no"}, headers=s.headers)
    await _progress(s, device_id, "failed")
    return s.client.get_workflow_handle(accepted["workflow_id"])


async def onboarding_cancelled(s: Stack) -> WorkflowHandle[Any, Any]:
    device_id = f"rec-{uuid.uuid4().hex[:8]}"
    body = {"device_id": device_id, "device_type": "sensor"}
    accepted = (await s.api.post("/v1/devices", json=body, headers=s.headers)).json()
    await _progress(s, device_id, "awaiting_first_contact")
    await s.api.delete(f"/v1/onboardings/{device_id}", headers=s.headers)
    await _progress(s, device_id, "cancelled")
    return s.client.get_workflow_handle(accepted["workflow_id"])


async def bulk_onboarding(s: Stack) -> WorkflowHandle[Any, Any]:
    devices = [{"device_id": f"rec-bulk-{i}", "device_type": "sensor"} for i in range(5)]
    accepted = (await s.api.post("/v1/devices:bulk", json={"devices": devices}, headers=s.headers)).json()
    handle = s.client.get_workflow_handle(accepted["workflow_id"])
    await handle.result()
    return handle


async def onboarding_again(s: Stack) -> WorkflowHandle[Any, Any]:
    """A gateway rejected, onboarded again with the same body, approved and activated."""
    device_id = f"rec-{uuid.uuid4().hex[:8]}"
    body = {"device_id": device_id, "device_type": "gateway", "config": {"site": "rec"}}
    await s.api.post("/v1/devices", json=body, headers=s.headers)
    await _progress(s, device_id, "awaiting_approval")
    await s.api.post(f"/v1/onboardings/{device_id}/reject", json={"reason": "no"}, headers=s.headers)
    await _progress(s, device_id, "failed")
    accepted = (await s.api.post("/v1/devices", json=body, headers=s.headers)).json()
    await _progress(s, device_id, "awaiting_approval")
    await s.api.post(f"/v1/onboardings/{device_id}/approve", json={}, headers=s.headers)
    waiting = await _progress(s, device_id, "awaiting_first_contact")
    auth = {"Authorization": f"Bearer {waiting['credential']}"}
    await s.api.post("/v1/device-contact", json={}, headers=auth)
    await _progress(s, device_id, "completed")
    return s.client.get_workflow_handle(accepted["workflow_id"], run_id=accepted["run_id"])


async def bulk_onboarding_cancelled(s: Stack) -> WorkflowHandle[Any, Any]:
    """A three-slice import cancelled while its slices provision: they stop, then all is undone."""
    tag = uuid.uuid4().hex[:6]
    devices = [{"device_id": f"rec-bc-{tag}-{i}", "device_type": "sensor"} for i in range(1200)]
    accepted = (await s.api.post("/v1/devices:bulk", json={"devices": devices}, headers=s.headers)).json()
    handle = s.client.get_workflow_handle(accepted["workflow_id"])
    for _ in range(300):  # cancel once a slice is provisioning
        events = (await handle.fetch_history()).events
        if any(e.HasField("activity_task_started_event_attributes") for e in events):
            break
        await asyncio.sleep(0.02)
    await handle.cancel()
    with contextlib.suppress(WorkflowFailureError):  # cancelled is the expected end
        await handle.result()
    return handle


async def event_delivery(s: Stack) -> WorkflowHandle[Any, Any]:
    """A subscription's delivery loop: an onboarding event delivered, then the subscription deleted."""
    received: list[bytes] = []
    connections: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        try:
            while True:  # one request after another on a keep-alive connection
                head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
                length = int(head.partition("content-length:")[2].split("\r\n")[0] or 0)
                received.append(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = {"url": f"http://127.0.0.1:{port}/hook", "event_types": ["*"], "secret": "recorded-" + "s" * 16}
    sub = (await s.api.post("/v1/subscriptions", json=body, headers=s.headers)).json()
    await onboarding_completed(s)
    for _ in range(300):
        if received:
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError("the DeviceOnboarded event was never delivered")
    await s.api.delete(f"/v1/subscriptions/{sub['subscription_id']}", headers=s.headers)
    handle = s.client.get_workflow_handle(sub["workflow_id"])
    await handle.result()
    server.close()
    for writer in connections:  # the sender's keep-alive connection ends its handler
        writer.close()
    await server.wait_closed()
    return handle


async def event_delivery_circuit(s: Stack) -> WorkflowHandle[Any, Any]:
    """A delivery loop whose receiver fails three times: its circuit opens at the first failure,
    the loop sleeps until each probe (two fail, the third closes it), the events are delivered
    in order (the onboarding's, then the circuit's own), then the subscription is deleted."""
    received: list[bytes] = []
    connections: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
                length = int(head.partition("content-length:")[2].split("\r\n")[0] or 0)
                received.append(await reader.readexactly(length))
                ok = len(received) > 3
                writer.write(
                    b"HTTP/1.1 204 No Content\r\n\r\n"
                    if ok
                    else b"HTTP/1.1 503 Down\r\ncontent-length: 0\r\n\r\n"
                )
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = {
        "url": f"http://127.0.0.1:{port}/hook",
        "event_types": ["*"],
        "secret": "recorded-" + "s" * 16,
        "circuit_threshold": 1,
        "circuit_probe_s": 1,
        "circuit_max_probe_s": 2,
    }
    sub = (await s.api.post("/v1/subscriptions", json=body, headers=s.headers)).json()
    await onboarding_completed(s)
    for _ in range(600):
        if len(received) >= 6:  # 3 failures, the onboarding's event, opened, closed
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError(f"the circuit never closed: {len(received)} requests")
    await s.api.delete(f"/v1/subscriptions/{sub['subscription_id']}", headers=s.headers)
    handle = s.client.get_workflow_handle(sub["workflow_id"])
    await handle.result()
    server.close()
    for writer in connections:
        writer.close()
    await server.wait_closed()
    return handle


async def _command_device(s: Stack) -> tuple[str, dict[str, str]]:
    creds = await _sensors(s, 1)
    device_id, credential = next(iter(creds.items()))
    return device_id, {"Authorization": f"Bearer {credential}"}


async def device_command(s: Stack) -> WorkflowHandle[Any, Any]:
    """A command delivered to a waiting device and answered."""
    device_id, auth = await _command_device(s)
    poll = asyncio.create_task(s.api.get("/v1/device/commands", params={"wait": 30}, headers=auth))
    await asyncio.sleep(0.2)
    body = {"name": "reboot", "params": {"delay_s": 1}, "timeout_s": 30, "expires_s": 600}
    sent = (await s.api.post(f"/v1/devices/{device_id}/commands", json=body, headers=s.headers)).json()
    handed = (await poll).json()["commands"]
    await s.api.post(
        f"/v1/device/commands/{handed[0]['command_id']}/result",
        json={"status": "succeeded", "result": {"ok": True}},
        headers=auth,
    )
    handle = s.client.get_workflow_handle(sent["workflow_id"])
    await handle.result()
    return handle


async def device_command_timed_out(s: Stack) -> WorkflowHandle[Any, Any]:
    """A command delivered but never answered: timed out."""
    device_id, auth = await _command_device(s)
    body = {"name": "reboot", "timeout_s": 1, "expires_s": 600}
    sent = (await s.api.post(f"/v1/devices/{device_id}/commands", json=body, headers=s.headers)).json()
    await s.api.get("/v1/device/commands", headers=auth)
    handle = s.client.get_workflow_handle(sent["workflow_id"])
    await handle.result()
    return handle


async def command_campaign(s: Stack) -> WorkflowHandle[Any, Any]:
    """A command to three devices on the rollout machinery: every one answers."""
    creds = await _sensors(s, 3)
    campaign = f"rec-cc-{uuid.uuid4().hex[:6]}"
    body = {
        "campaign_id": campaign,
        "device_type": "sensor",
        "command": {"name": "calibrate", "params": {"ref": 1}, "timeout_s": 30},
        "target": {"device_ids": list(creds)},
        "policy": {"canary": 1, "rate_per_minute": 60000},
    }
    started = (await s.api.post("/v1/rollouts", json=body, headers=s.headers)).json()
    handle = s.client.get_workflow_handle(started["workflow_id"])
    for _ in range(400):
        for credential in creds.values():
            auth = {"Authorization": f"Bearer {credential}"}
            for command in (await s.api.get("/v1/device/commands", headers=auth)).json()["commands"]:
                url = f"/v1/device/commands/{command['command_id']}/result"
                await s.api.post(url, json={"status": "succeeded"}, headers=auth)
        progress = (await s.api.get(f"/v1/rollouts/{campaign}", headers=s.headers)).json()
        if progress["status"] in ("completed", "aborted", "cancelled"):
            await handle.result()
            return handle
        await asyncio.sleep(0.05)
    raise RuntimeError("the command campaign did not end")


async def reconciliation(s: Stack) -> WorkflowHandle[Any, Any]:
    """A run (POST /v1/consistency:run) that starts the twin an active device lost."""
    onboarding = await onboarding_completed(s)
    device_id = onboarding.id.removeprefix("onboard-bench-")
    await s.client.get_workflow_handle(f"twin-bench-{device_id}").terminate("recording: a twin is lost")
    started = (await s.api.post("/v1/consistency:run", headers=s.headers)).json()
    handle = s.client.get_workflow_handle(started["workflow_id"])
    await handle.result()
    return handle


async def system_check(s: Stack) -> WorkflowHandle[Any, Any]:
    report = (await s.api.get("/health", headers=s.headers)).json()
    assert report["ok"], report
    runs = [w async for w in s.client.list_workflows("WorkflowType = 'SystemCheck'")]
    return s.client.get_workflow_handle(runs[0].id)


async def alert_lifecycle(s: Stack) -> WorkflowHandle[Any, Any]:
    """An alert raised by a rule, then acknowledged by hand (the event recorded)."""
    await telemetry_ingestion(s)
    alerts = (await s.api.get("/v1/alerts", params={"status": "open"}, headers=s.headers)).json()
    alert_id = alerts[0]["alert_id"]
    acked = await s.api.post(f"/v1/alerts/{alert_id}/acknowledge", json={"comment": "rec"}, headers=s.headers)
    if acked.status_code != 200:
        raise RuntimeError(acked.text)
    return s.client.get_workflow_handle(tenant_scoped_id("alert", "bench", f"{alert_id}-acknowledge"))


async def threshold_alert(s: Stack) -> WorkflowHandle[Any, Any]:
    """An alert raised as its reading was accepted (the ingestion scenario's 35 above 30)."""
    await telemetry_ingestion(s)
    runs = [w async for w in s.client.list_workflows("WorkflowType = 'ThresholdAlert'")]
    handle = s.client.get_workflow_handle(runs[0].id, run_id=runs[0].run_id)
    if await handle.result() != 1:
        raise RuntimeError("the early alert recorded no event")
    return handle


async def credential_rotation(s: Stack) -> WorkflowHandle[Any, Any]:
    """A fleet of three sensors rotated by tag in one run (an outcome per device)."""
    await _sensors(s, 3)
    started = await s.api.post("/v1/credential-rotations", json={"device_type": "sensor"}, headers=s.headers)
    if started.status_code != 202:
        raise RuntimeError(started.text)
    rotation_id = started.json()["rotation_id"]
    handle = s.client.get_workflow_handle(tenant_scoped_id("credential-rotation", "bench", rotation_id))
    await handle.result()
    return handle


async def retention_scheduled(s: Stack) -> WorkflowHandle[Any, Any]:
    """A Retention run its schedule started (no token: proved by the schedule's description)."""
    from fleetflow.contracts.retention import RETENTION_ID

    schedule = s.client.get_schedule_handle(RETENTION_ID)  # the API applied it at start-up
    await schedule.trigger()
    for _ in range(600):
        recent = (await schedule.describe()).info.recent_actions
        action = recent[-1].action if recent else None
        if isinstance(action, ScheduleActionExecutionStartWorkflow):
            handle = s.client.get_workflow_handle(action.workflow_id)
            await handle.result()
            return handle
        await asyncio.sleep(0.1)
    raise AssertionError("the schedule started nothing")


SCENARIOS: dict[str, Scenario] = {
    "system_check": system_check,
    "onboarding_completed": onboarding_completed,
    "onboarding_rejected": onboarding_rejected,
    "onboarding_cancelled": onboarding_cancelled,
    "bulk_onboarding": bulk_onboarding,
    "onboarding_again": onboarding_again,
    "bulk_onboarding_cancelled": bulk_onboarding_cancelled,
    "device_twin": device_twin,
    "device_twin_waits": device_twin_waits,
    "telemetry_ingestion": telemetry_ingestion,
    "telemetry_ingestion_ready": telemetry_ingestion_ready,
    "telemetry_poison": telemetry_poison,
    "ingestion_supervisor": ingestion_supervisor,
    "firmware_rollout": firmware_rollout,
    "firmware_rollout_cancelled": firmware_rollout_cancelled,
    "firmware_rollout_cancelled_at_start": firmware_rollout_cancelled_at_start,
    "device_decommission": device_decommission,
    "event_delivery": event_delivery,
    "event_delivery_circuit": event_delivery_circuit,
    "alert_lifecycle": alert_lifecycle,
    "threshold_alert": threshold_alert,
    "credential_rotation": credential_rotation,
    "device_command": device_command,
    "device_command_timed_out": device_command_timed_out,
    "command_campaign": command_campaign,
    "retention_scheduled": retention_scheduled,
    "reconciliation": reconciliation,
}


def _new_path(name: str) -> Path:
    """Histories accumulate: an older one stays, so the code must keep replaying it."""
    path, n = HISTORIES / f"{name}.json", 1
    while path.exists():
        n += 1
        path = HISTORIES / f"{name}-{n}.json"
    return path


async def record(names: list[str]) -> None:
    """Run the named scenarios (all by default) and write their histories."""
    HISTORIES.mkdir(parents=True, exist_ok=True)
    async with stack(payload_keys=REPLAY_PAYLOAD_KEYS) as s:
        for name in names or list(SCENARIOS):
            handle = await SCENARIOS[name](s)
            history = await handle.fetch_history()
            path = _new_path(name)
            path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
            say(f"recorded {name}: {len(history.events)} events -> {path}")


if __name__ == "__main__":
    asyncio.run(record(sys.argv[1:]))
    sys.stderr.flush()
    os._exit(0)
