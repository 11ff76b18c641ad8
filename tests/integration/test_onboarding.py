"""Onboarding through the API, on the real dev server and PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from fleetflow.db import Pool
from fleetflow.keys import KeyRing
from tests.integration.conftest import FAULTS, RETYPE
from tests.integration.flows import AUTH, contact, new_id, onboard, progress_until
from tests.support import bearer, eventually


async def leftovers(pool: Pool, device_id: str) -> dict[str, Any]:
    """What an onboarding left in the database for device_id."""
    return {
        "status": await pool.fetchval(
            "SELECT status FROM device.devices WHERE tenant = 'acme' AND device_id = $1", device_id
        ),
        "live_credentials": await pool.fetchval(
            """SELECT count(*) FROM device.credentials
               WHERE tenant = 'acme' AND device_id = $1 AND revoked_at IS NULL""",
            device_id,
        ),
        "credentials": await pool.fetchval(
            "SELECT count(*) FROM device.credentials WHERE tenant = 'acme' AND device_id = $1",
            device_id,
        ),
        "config": await pool.fetchval(
            "SELECT count(*) FROM device.configurations WHERE tenant = 'acme' AND device_id = $1",
            device_id,
        ),
        "events": await pool.fetchval(
            """SELECT count(*) FROM notification.events
               WHERE tenant = 'acme' AND device_id = $1 AND type = 'DeviceOnboarded'""",
            device_id,
        ),
    }


async def test_happy_path_activates_device_with_one_credential(api: httpx.AsyncClient, pool: Pool) -> None:
    device_id = new_id()
    accepted = await onboard(api, device_id, tags=["lab", "floor-2"], config={"target_c": 19})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["workflow_id"] == f"onboard-acme-{device_id}"
    assert "/workflows/onboard-acme-" in accepted.json()["temporal_ui_url"]

    waiting = await progress_until(api, device_id, "awaiting_first_contact")
    assert waiting["completed_steps"] == ["validate", "register", "issue_credential", "store_config"]
    assert (await contact(api, waiting["credential"], firmware_version="2.1.0")).status_code == 202

    done = await progress_until(api, device_id, "completed")
    assert done["credential"] is None  # the secret is not kept around once used
    device = (await api.get(f"/v1/devices/{device_id}", headers=AUTH)).json()
    assert device["status"] == "active"
    assert device["firmware_version"] == "2.1.0"
    assert device["tags"] == ["lab", "floor-2"]
    assert await leftovers(pool, device_id) == {
        "status": "active",
        "live_credentials": 1,
        "credentials": 1,
        "config": 1,
        "events": 1,
    }
    config = await pool.fetchval("SELECT config FROM device.configurations WHERE device_id = $1", device_id)
    assert config == {"target_c": 19, "mode": "auto", "report_interval_s": 60}
    history = await pool.fetch(
        "SELECT to_status FROM device.status_changes WHERE device_id = $1 ORDER BY id", device_id
    )
    assert [r["to_status"] for r in history] == ["pending", "provisioned", "active"]


async def test_the_hot_path_takes_fewer_workflow_tasks(api: httpx.AsyncClient, client: Client) -> None:
    device_id = new_id("fast")
    accepted = await onboard(api, device_id)
    waiting = await progress_until(api, device_id, "awaiting_first_contact")
    assert (await contact(api, waiting["credential"])).status_code == 202
    await progress_until(api, device_id, "completed")
    handle = client.get_workflow_handle(accepted.json()["workflow_id"])
    events = (await handle.fetch_history()).events
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    # validation, registration, credential and configuration are one activity task (one
    # transaction); activation runs alone, then the twin's start and DeviceOnboarded's recording
    assert scheduled == ["device.provision_device", "device.activate", "notification.record_events"]
    task_of: dict[str, int] = {}
    task = 0
    for e in events:
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            task += 1
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            task_of[e.activity_task_scheduled_event_attributes.activity_type.name] = task
        elif e.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED:
            task_of["twin"] = task
        elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            task_of["contact"] = task
    # the credential is out after the second workflow task: the one that saw it issued
    assert task_of["contact"] <= 2
    assert task_of["device.activate"] < task_of["twin"] == task_of["notification.record_events"]


async def test_a_lost_report_of_the_provisioning_is_found_by_its_retry(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    # the one transaction committed, then its attempt was lost: the retry finds its own
    # registration, credential and configuration, and the device ends with one of each
    device_id = new_id("again")
    FAULTS[device_id] = "provision_lost"
    accepted = await onboard(api, device_id)
    assert accepted.status_code == 202
    waiting = await progress_until(api, device_id, "awaiting_first_contact")
    events = (await client.get_workflow_handle(accepted.json()["workflow_id"]).fetch_history()).events
    started = [e for e in events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED]
    assert started[0].activity_task_started_event_attributes.attempt == 2  # the retry's
    assert waiting["completed_steps"] == ["validate", "register", "issue_credential", "store_config"]
    assert (await contact(api, waiting["credential"])).status_code == 202
    await progress_until(api, device_id, "completed")
    assert await leftovers(pool, device_id) == {
        "status": "active",
        "live_credentials": 1,
        "credentials": 1,
        "config": 1,
        "events": 1,
    }


async def _own_type(api: httpx.AsyncClient, **settings: Any) -> str:
    name = f"own-{uuid.uuid4().hex[:6]}"
    body = {"name": name, "config_schema": {"type": "object"}, **settings}
    put = await api.put(f"/v1/device-types/{name}", json=body, headers=AUTH)
    assert put.status_code == 200, put.text
    return name


async def test_a_lost_provisioning_keeps_its_credential_when_the_type_needs_approval_since(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    # the one transaction issued the credential (no approval then); the type needs approval by
    # the retry: the retry must not hide the committed credential (the workflow would never
    # revoke it, a live credential nobody knows of)
    kind = await _own_type(api, requires_approval=False)
    device_id = new_id("retyped")
    FAULTS[device_id] = "provision_lost"
    RETYPE[device_id] = {"requires_approval": True}
    body = {"device_id": device_id, "device_type": kind, "config": {}}
    assert (await api.post("/v1/devices", json=body, headers=AUTH)).status_code == 202
    waiting = await progress_until(api, device_id, "awaiting_first_contact", "awaiting_approval")
    assert waiting["status"] == "awaiting_first_contact"
    assert (await contact(api, waiting["credential"])).status_code == 202
    await progress_until(api, device_id, "completed")
    left = await leftovers(pool, device_id)
    assert (left["status"], left["live_credentials"], left["credentials"]) == ("active", 1, 1)


async def test_a_lost_provisioning_returns_the_credential_it_stored_when_the_lifetime_changed(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    # the retry returns the token whose hash the first attempt stored, not one re-signed with
    # the type's new lifetime (a token the API would refuse)
    kind = await _own_type(api, credential_lifetime_days=30)
    device_id = new_id("relife")
    FAULTS[device_id] = "provision_lost"
    RETYPE[device_id] = {"credential_lifetime_days": 5}
    body = {"device_id": device_id, "device_type": kind, "config": {}}
    assert (await api.post("/v1/devices", json=body, headers=AUTH)).status_code == 202
    waiting = await progress_until(api, device_id, "awaiting_first_contact")
    assert (await contact(api, waiting["credential"])).status_code == 202
    await progress_until(api, device_id, "completed")


async def test_an_approved_device_undoes_its_credential_and_configuration_once(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    # a type that needs approval is only registered by the first step: the undos of the
    # credential and configuration it did not write are dropped, those of the later steps run
    device_id = new_id("gw")
    FAULTS[device_id] = "store_config"
    body = {"device_id": device_id, "device_type": "gateway", "config": {"site": "oslo"}}
    assert (await api.post("/v1/devices", json=body, headers=AUTH)).status_code == 202
    await progress_until(api, device_id, "awaiting_approval")
    assert (await api.post(f"/v1/onboardings/{device_id}/approve", json={}, headers=AUTH)).status_code == 200
    failed = await progress_until(api, device_id, "failed")
    assert "injected failure at store_config" in failed["reason"]
    assert failed["compensations"] == ["remove_config", "revoke_credential", "mark_registration_failed"]
    left = await leftovers(pool, device_id)
    assert (left["status"], left["live_credentials"], left["config"]) == ("failed", 0, 0)


async def test_a_retry_refused_at_validation_still_undoes_the_registration(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    # validation and registration are one activity: a refusal of a retry's validation may
    # follow a registration the lost attempt committed, so its undo must run
    device_id = new_id("lost")
    FAULTS[device_id] = "register_lost"
    assert (await onboard(api, device_id)).status_code == 202
    failed = await progress_until(api, device_id, "failed")
    assert "injected failure at validate" in failed["reason"]
    assert failed["compensations"] == ["remove_config", "revoke_credential", "mark_registration_failed"]
    assert (await leftovers(pool, device_id))["live_credentials"] == 0
    assert (await leftovers(pool, device_id))["status"] == "failed"


async def test_repeated_request_returns_the_same_run_and_a_different_one_conflicts(
    api: httpx.AsyncClient, client: Client
) -> None:
    device_id = new_id()
    first = await onboard(api, device_id, tags=["a"])
    again = await onboard(api, device_id, tags=["a"])
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["run_id"] == first.json()["run_id"]
    assert again.json()["existing"] is True
    other = await onboard(api, device_id, tags=["b"])
    assert other.status_code == 409
    runs = [w async for w in client.list_workflows(f"WorkflowId = 'onboard-acme-{device_id}'")]
    assert len(runs) == 1
    await api.delete(f"/v1/onboardings/{device_id}", headers=AUTH)


EXPECTED_UNDO = {
    "validate": [],
    # registration, credential and configuration are one transaction: a failure after it
    # (here: its commit, then a lost report) undoes all three
    "register": ["remove_config", "revoke_credential", "mark_registration_failed"],
    "provision_device": ["remove_config", "revoke_credential", "mark_registration_failed"],
    "issue_credential": ["remove_config", "revoke_credential", "mark_registration_failed"],
    "store_config": ["remove_config", "revoke_credential", "mark_registration_failed"],
    # activation runs alone, before the twin and DeviceOnboarded: nothing of those to undo
    "activate": ["remove_config", "revoke_credential", "mark_registration_failed"],
    "record_event": [
        "retract_event",
        "end_twin",
        "remove_config",
        "revoke_credential",
        "mark_registration_failed",
    ],
}


@pytest.mark.parametrize("step", list(EXPECTED_UNDO))
async def test_failure_at_each_step_leaves_nothing_behind(
    step: str, api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id = new_id(step.replace("_", "-"))
    FAULTS[device_id] = step
    assert (await onboard(api, device_id)).status_code == 202
    credential = None
    if step in ("activate", "record_event"):
        waiting = await progress_until(api, device_id, "awaiting_first_contact")
        credential = waiting["credential"]
        assert (await contact(api, credential)).status_code == 202

    failed = await progress_until(api, device_id, "failed")
    assert f"injected failure at {step}" in failed["reason"]
    assert failed["compensations"] == EXPECTED_UNDO[step]
    left = await leftovers(pool, device_id)
    assert left["status"] in (None, "failed")
    assert left["status"] == (None if step == "validate" else "failed")
    assert left["live_credentials"] == 0 and left["config"] == 0 and left["events"] == 0
    if credential is not None:  # the revoked credential is refused at once
        assert (await contact(api, credential)).status_code == 401


async def test_reject_compensates_and_needs_the_approve_scope(api: httpx.AsyncClient, pool: Pool) -> None:
    device_id = new_id("gw")
    body = {"device_id": device_id, "device_type": "gateway", "config": {"site": "berlin"}}
    assert (await api.post("/v1/devices", json=body, headers=AUTH)).status_code == 202
    waiting = await progress_until(api, device_id, "awaiting_approval")
    assert waiting["credential"] is None

    writer_only = bearer("acme", ["devices:read", "devices:write"])
    refused = await api.post(f"/v1/onboardings/{device_id}/reject", json={}, headers=writer_only)
    assert refused.status_code == 403

    rejected = await api.post(
        f"/v1/onboardings/{device_id}/reject", json={"reason": "unknown site"}, headers=AUTH
    )
    assert rejected.status_code == 200, rejected.text
    failed = await progress_until(api, device_id, "failed")
    assert "rejected by tester: unknown site" in failed["reason"]
    assert failed["compensations"] == ["mark_registration_failed"]
    assert (await leftovers(pool, device_id))["status"] == "failed"
    late = await api.post(f"/v1/onboardings/{device_id}/approve", json={}, headers=AUTH)
    assert late.status_code == 409


async def test_approved_device_goes_on_to_its_credential(api: httpx.AsyncClient) -> None:
    device_id = new_id("gw")
    body = {"device_id": device_id, "device_type": "gateway", "config": {"site": "oslo"}}
    await api.post("/v1/devices", json=body, headers=AUTH)
    await progress_until(api, device_id, "awaiting_approval")
    approved = await api.post(f"/v1/onboardings/{device_id}/approve", json={}, headers=AUTH)
    assert approved.status_code == 200, approved.text
    waiting = await progress_until(api, device_id, "awaiting_first_contact")
    assert waiting["decided_by"] == "tester"
    assert "await_approval" in waiting["completed_steps"]
    await api.delete(f"/v1/onboardings/{device_id}", headers=AUTH)


async def test_cancel_compensates_and_the_device_can_be_onboarded_again(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id = new_id()
    await onboard(api, device_id)
    waiting = await progress_until(api, device_id, "awaiting_first_contact")
    assert (await api.delete(f"/v1/onboardings/{device_id}", headers=AUTH)).status_code == 202
    cancelled = await progress_until(api, device_id, "cancelled")
    assert cancelled["compensations"] == ["remove_config", "revoke_credential", "mark_registration_failed"]
    left = await leftovers(pool, device_id)
    assert left["status"] == "failed" and left["live_credentials"] == 0 and left["config"] == 0
    assert (await contact(api, waiting["credential"])).status_code == 401

    # a failed onboarding does not block a new one for the same device
    retry = await onboard(api, device_id, firmware_version="1.0.1")
    assert retry.status_code == 202, retry.text
    assert retry.json()["run_id"] != cancelled.get("run_id")
    await progress_until(api, device_id, "awaiting_first_contact")
    await api.delete(f"/v1/onboardings/{device_id}", headers=AUTH)


BAD_BODIES = [
    ({"device_id": "x1", "device_type": "thermostat", "colour": "red"}, ["body", "colour"]),
    ({"device_id": "bad id!", "device_type": "thermostat"}, ["body", "device_id"]),
    ({"device_id": "x2", "device_type": "toaster"}, ["body", "device_type"]),
    (
        {"device_id": "x3", "device_type": "thermostat", "config": {"target_c": 99}},
        ["body", "config", "target_c"],
    ),
    ({"device_id": "x4", "device_type": "thermostat", "config": {"fan": 1}}, ["body", "config", "fan"]),
    (
        {"device_id": "x5", "device_type": "thermostat", "metadata": {"blob": "z" * 9000}},
        ["body", "metadata"],
    ),
    ({"device_id": "x6", "device_type": "gateway", "config": {"site": ""}}, ["body", "config", "site"]),
]


@pytest.mark.parametrize(("body", "loc"), BAD_BODIES)
async def test_bad_input_names_the_field_and_starts_nothing(
    body: dict[str, Any], loc: list[str], api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    body = (
        {**body, "device_id": body["device_id"] + "-" + uuid.uuid4().hex[:6]}
        if body["device_id"] != "bad id!"
        else body
    )
    response = await api.post("/v1/devices", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    problems = response.json()["errors"]
    assert any(p["loc"][: len(loc)] == loc for p in problems), problems
    runs = [w async for w in client.list_workflows(f"WorkflowId = 'onboard-acme-{body['device_id']}'")]
    assert runs == []
    assert (await leftovers(pool, body["device_id"]))["status"] is None


async def test_tokens_are_checked(api: httpx.AsyncClient, settings: Any, tmp_path: Path) -> None:
    from datetime import timedelta

    missing = await api.get("/v1/devices")
    assert missing.status_code == 401 and missing.json()["detail"] == "missing bearer token"
    expired = await api.get("/v1/devices", headers=bearer(ttl=timedelta(seconds=-5)))
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    forged = await api.get("/v1/devices", headers=bearer(ring=KeyRing(tmp_path)))
    assert forged.status_code == 401
    read_only = bearer("acme", ["devices:read"])
    assert (await onboard(api, new_id())).status_code == 202
    denied = await api.post(
        "/v1/devices", json={"device_id": new_id(), "device_type": "thermostat"}, headers=read_only
    )
    assert denied.status_code == 403
    # devices:* cannot reach another tenant's device: 404, so ids do not leak
    device_id = new_id()
    await onboard(api, device_id)
    other = await api.get(f"/v1/devices/{device_id}", headers=bearer("globex"))
    assert other.status_code == 404
    assert (await api.get(f"/v1/onboardings/{device_id}", headers=bearer("globex"))).status_code == 404


async def test_run_is_found_by_device_id_through_the_web_ui(api: httpx.AsyncClient, settings: Any) -> None:
    device_id = new_id("ui")
    await onboard(api, device_id)
    query = f'DeviceId="{device_id}"'
    url = f"{settings.temporal_ui_url}/api/v1/namespaces/default/workflows"

    async def listed() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(url, params={"query": query})
            response.raise_for_status()
            executions: list[dict[str, Any]] = response.json().get("executions", [])
            return executions

    found = await eventually(listed, lambda runs: len(runs) == 1)
    assert found[0]["execution"]["workflowId"] == f"onboard-acme-{device_id}"
    await api.delete(f"/v1/onboardings/{device_id}", headers=AUTH)
