"""Onboarding at the edges: a device onboarded again after a failed attempt, a cancel that lands
while a step is in flight, compensation that a cancel cannot cut short, a late approval."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from api.routers.devices import _fingerprint
from fleetflow.contracts.devices import DeviceSpec
from fleetflow.db import Pool
from tests.integration.conftest import ENTERED, FAULTS, FINISHED, HOLDS
from tests.integration.flows import AUTH, contact, new_id, onboard, progress_until
from tests.integration.test_onboarding import leftovers
from tests.support import eventually


@pytest.fixture
def holds() -> Iterator[dict[str, asyncio.Event]]:
    yield HOLDS
    for gate in HOLDS.values():
        gate.set()
    HOLDS.clear()


async def hold(key: str) -> asyncio.Event:
    HOLDS[key] = asyncio.Event()
    return HOLDS[key]


async def until_entered(key: str) -> None:
    await eventually(lambda: asyncio.sleep(0, key in ENTERED), bool)


async def until_finished(key: str) -> None:
    """Wait until a held step has ended: whatever it committed is in the database."""
    await eventually(lambda: asyncio.sleep(0, key in FINISHED), bool)


async def until_handled(handle: WorkflowHandle[Any, Any], request: EventType.ValueType) -> None:
    """Wait until a workflow task completed after `request` (a cancel) was recorded, or the run closed."""

    async def kinds() -> list[EventType.ValueType]:
        return [e.event_type for e in (await handle.fetch_history()).events]

    def handled(events: list[EventType.ValueType]) -> bool:
        if request not in events:
            return False
        after = events[events.index(request) :]
        return EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in after

    await eventually(kinds, handled)


async def activate(api: httpx.AsyncClient, device_id: str) -> None:
    waiting = await progress_until(api, device_id, "awaiting_first_contact")
    assert (await contact(api, waiting["credential"])).status_code == 202
    await progress_until(api, device_id, "completed")


async def assert_active_with_one_live_credential(api: httpx.AsyncClient, pool: Pool, device_id: str) -> None:
    device = (await api.get(f"/v1/devices/{device_id}", headers=AUTH)).json()
    assert device["status"] == "active"
    left = await leftovers(pool, device_id)
    assert (left["status"], left["live_credentials"], left["config"], left["events"]) == ("active", 1, 1, 1)


# --- a new attempt after a failed one (item 3) --------------------------------------


async def test_a_rejected_device_is_onboarded_again(api: httpx.AsyncClient, pool: Pool) -> None:
    device_id = new_id("gw")
    body = {"device_id": device_id, "device_type": "gateway", "config": {"site": "berlin"}}
    first = await api.post("/v1/devices", json=body, headers=AUTH)
    await progress_until(api, device_id, "awaiting_approval")
    too_long = await api.post(f"/v1/onboardings/{device_id}/reject", json={"reason": "r" * 501}, headers=AUTH)
    assert too_long.status_code == 422 and too_long.json()["errors"][0]["loc"] == ["body", "reason"]
    await api.post(f"/v1/onboardings/{device_id}/reject", json={"reason": "not yet"}, headers=AUTH)
    await progress_until(api, device_id, "failed")

    again = await api.post("/v1/devices", json=body, headers=AUTH)  # the same body: a new attempt
    assert again.status_code == 202, again.text
    assert again.json()["run_id"] != first.json()["run_id"] and again.json()["existing"] is False
    await progress_until(api, device_id, "awaiting_approval")
    approved = await api.post(f"/v1/onboardings/{device_id}/approve", json={}, headers=AUTH)
    assert approved.status_code == 200, approved.text
    await activate(api, device_id)
    await assert_active_with_one_live_credential(api, pool, device_id)
    # while the new attempt is done, the same body returns it; another body is refused
    assert (await api.post("/v1/devices", json=body, headers=AUTH)).json()["run_id"] == again.json()["run_id"]
    other = {**body, "config": {"site": "oslo"}}
    assert (await api.post("/v1/devices", json=other, headers=AUTH)).status_code == 409


async def test_a_cancelled_device_is_onboarded_again(api: httpx.AsyncClient, pool: Pool) -> None:
    device_id = new_id()
    await onboard(api, device_id)
    old = await progress_until(api, device_id, "awaiting_first_contact")
    assert (await api.delete(f"/v1/onboardings/{device_id}", headers=AUTH)).status_code == 202
    await progress_until(api, device_id, "cancelled")

    assert (await onboard(api, device_id)).status_code == 202
    await activate(api, device_id)
    await assert_active_with_one_live_credential(api, pool, device_id)
    assert (await contact(api, old["credential"])).status_code == 401  # the earlier attempt's stays dead


async def test_a_device_whose_first_contact_timed_out_is_onboarded_again(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id = new_id()
    await onboard(api, device_id, first_contact_timeout_s=1)
    failed = await progress_until(api, device_id, "failed")
    assert failed["reason"] == "no first contact within 1 s"

    assert (await onboard(api, device_id)).status_code == 202
    await activate(api, device_id)
    await assert_active_with_one_live_credential(api, pool, device_id)


async def test_a_device_whose_run_was_terminated_is_onboarded_again(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    device_id = new_id()
    accepted = await onboard(api, device_id)
    old = await progress_until(api, device_id, "awaiting_first_contact")
    await client.get_workflow_handle(accepted.json()["workflow_id"]).terminate("operator")
    # the terminated run could not compensate: its registration stays `provisioned`
    assert (await leftovers(pool, device_id))["status"] == "provisioned"

    assert (await onboard(api, device_id)).status_code == 202
    await activate(api, device_id)
    await assert_active_with_one_live_credential(api, pool, device_id)
    assert (await contact(api, old["credential"])).status_code == 401  # taken over: revoked


# --- a cancel while a step is in flight (item 6) ---------------------------------------


# the registration, credential and configuration are one step (`provision_device`)
@pytest.mark.parametrize("step", ["provision_device"])
async def test_a_cancel_during_a_step_leaves_nothing_behind(
    step: str, api: httpx.AsyncClient, client: Client, pool: Pool, holds: dict[str, asyncio.Event]
) -> None:
    device_id = new_id(step.replace("_", "-"))
    gate = await hold(f"{step}:{device_id}")
    accepted = await onboard(api, device_id)
    await until_entered(f"{step}:{device_id}")
    assert (await api.delete(f"/v1/onboardings/{device_id}", headers=AUTH)).status_code == 202
    handle = client.get_workflow_handle(accepted.json()["workflow_id"])
    await until_handled(handle, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    gate.set()  # the step commits after the cancel arrived

    await progress_until(api, device_id, "cancelled")
    await until_finished(f"{step}:{device_id}")
    left = await leftovers(pool, device_id)
    assert (left["status"], left["live_credentials"], left["config"]) == ("failed", 0, 0)
    assert (await onboard(api, device_id)).status_code == 202  # nothing stuck `pending`
    await activate(api, device_id)
    await assert_active_with_one_live_credential(api, pool, device_id)


# --- compensation and approval at the edges (items 7, 11) ------------------------------


async def test_a_late_approval_is_refused_and_a_cancel_does_not_cut_compensation_short(
    api: httpx.AsyncClient, client: Client, pool: Pool, holds: dict[str, asyncio.Event]
) -> None:
    device_id = new_id("gw")
    body: dict[str, Any] = {"device_id": device_id, "device_type": "gateway", "config": {"site": "x"}}
    body["approval_timeout_s"] = 1
    gate = await hold(f"mark_failed:{device_id}")
    accepted = await api.post("/v1/devices", json=body, headers=AUTH)
    await progress_until(api, device_id, "compensating")
    await until_entered(f"mark_failed:{device_id}")

    late = await api.post(f"/v1/onboardings/{device_id}/approve", json={}, headers=AUTH)
    assert late.status_code == 409, late.text
    assert "not awaiting approval" in late.json()["detail"]

    assert (await api.delete(f"/v1/onboardings/{device_id}", headers=AUTH)).status_code == 202
    handle = client.get_workflow_handle(accepted.json()["workflow_id"])
    await until_handled(handle, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    gate.set()
    failed = await progress_until(api, device_id, "failed", "cancelled")
    assert failed["status"] == "failed" and failed["reason"] == "no approval within 1 s"
    assert failed["compensations"] == ["mark_registration_failed"]
    assert (await leftovers(pool, device_id))["status"] == "failed"


# --- bulk: stop, wait for the slices, then undo (item 6) ------------------------------


def bulk_id_of(devices: list[dict[str, Any]]) -> str:
    """The bulk id the API gives this body (to hold its slices before it starts)."""
    specs = [DeviceSpec.model_validate(d).model_dump(mode="json") for d in devices]
    return _fingerprint(["acme", specs])[:20]


async def bulk_state(pool: Pool, prefix: str) -> tuple[int, int]:
    """Active devices and live credentials whose id starts with prefix."""
    active = await pool.fetchval(
        """SELECT count(*) FROM device.devices
           WHERE tenant = 'acme' AND device_id LIKE $1 AND status = 'active'""",
        f"{prefix}-%",
    )
    live = await pool.fetchval(
        """SELECT count(*) FROM device.credentials
           WHERE tenant = 'acme' AND device_id LIKE $1 AND revoked_at IS NULL""",
        f"{prefix}-%",
    )
    return int(active), int(live)


async def onboarded_events(pool: Pool, prefix: str) -> int:
    """DeviceOnboarded events recorded for devices whose id starts with prefix."""
    count: int = await pool.fetchval(
        """SELECT count(*) FROM notification.events
           WHERE tenant = 'acme' AND type = 'DeviceOnboarded' AND device_id LIKE $1""",
        f"{prefix}-%",
    )
    return count


def sensors(prefix: str, count: int) -> list[dict[str, Any]]:
    return [{"device_id": f"{prefix}-{i:04d}", "device_type": "sensor"} for i in range(count)]


async def test_a_bulk_cancel_while_a_slice_provisions_leaves_nothing_live(
    api: httpx.AsyncClient, client: Client, pool: Pool, holds: dict[str, asyncio.Event]
) -> None:
    prefix = new_id("bc")
    devices = sensors(prefix, 3)
    bulk_id = bulk_id_of(devices)
    gate = await hold(f"provision_batch:{bulk_id}:0")
    accepted = await api.post("/v1/devices:bulk", json={"devices": devices}, headers=AUTH)
    assert accepted.status_code == 202 and accepted.json()["bulk_id"] == bulk_id
    await until_entered(f"provision_batch:{bulk_id}:0")
    handle = client.get_workflow_handle(accepted.json()["workflow_id"])
    await handle.cancel()
    await until_handled(handle, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    gate.set()  # the slice goes on after the cancel arrived

    async def status() -> str:
        return str((await api.get(f"/v1/bulk-onboardings/{bulk_id}", headers=AUTH)).json()["status"])

    assert await eventually(status, lambda s: s in ("cancelled", "failed")) == "cancelled"
    await until_finished(f"provision_batch:{bulk_id}:0")
    assert await bulk_state(pool, prefix) == (0, 0)

    # the same import again is a new attempt: every device active
    again = await api.post("/v1/devices:bulk", json={"devices": devices}, headers=AUTH)
    assert again.status_code == 202, again.text
    assert await eventually(status, lambda s: s in ("completed", "failed")) == "completed"
    assert (await api.get(f"/v1/bulk-onboardings/{bulk_id}", headers=AUTH)).json()["onboarded"] == 3
    assert await bulk_state(pool, prefix) == (3, 3)


async def test_a_failed_bulk_slice_stops_the_others_before_the_undo(
    api: httpx.AsyncClient, client: Client, pool: Pool, holds: dict[str, asyncio.Event]
) -> None:
    prefix = new_id("bf")
    devices = sensors(prefix, 501)  # two slices of the default 500, run side by side
    bulk_id = bulk_id_of(devices)
    gate = await hold(f"provision_batch:{bulk_id}:500")
    FAULTS[f"{bulk_id}:0"] = "provision_batch"
    accepted = await api.post("/v1/devices:bulk", json={"devices": devices}, headers=AUTH)
    assert accepted.status_code == 202
    await until_entered(f"provision_batch:{bulk_id}:500")
    handle = client.get_workflow_handle(accepted.json()["workflow_id"])

    async def kinds() -> list[EventType.ValueType]:
        return [e.event_type for e in (await handle.fetch_history()).events]

    # the first slice failed: the run either asks the held one to stop or (before the fix) ends
    await eventually(
        kinds,
        lambda k: (
            EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED in k
            or EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED in k
        ),
        60,
    )
    gate.set()
    progress = await eventually(
        lambda: api.get(f"/v1/bulk-onboardings/{bulk_id}", headers=AUTH),
        lambda r: r.json()["status"] == "failed",
        60,
    )
    assert "injected failure at provision_batch" in progress.json()["reason"]
    assert progress.json()["onboarded"] == 0
    await eventually(lambda: handle.describe(), lambda d: d.close_time is not None)
    await until_finished(f"provision_batch:{bulk_id}:500")
    assert await bulk_state(pool, prefix) == (0, 0)


async def test_a_bulk_slice_whose_events_are_not_recorded_is_undone(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    prefix = new_id("be")
    devices = sensors(prefix, 3)
    FAULTS[devices[1]["device_id"]] = "record_event"
    accepted = await api.post("/v1/devices:bulk", json={"devices": devices}, headers=AUTH)
    progress = await eventually(
        lambda: api.get(accepted.json()["status_url"], headers=AUTH),
        lambda r: r.json()["status"] in ("completed", "failed"),
    )
    assert (progress.json()["status"], progress.json()["onboarded"], progress.json()["failed"]) == (
        "completed",
        0,
        3,
    )
    assert all("event not recorded" in f["reason"] for f in progress.json()["failures"])
    assert await bulk_state(pool, prefix) == (0, 0)
    assert await onboarded_events(pool, prefix) == 0  # recorded before the failure: retracted
    changes = await pool.fetch(
        """SELECT from_status, to_status FROM device.status_changes
           WHERE tenant = 'acme' AND device_id = $1 ORDER BY id""",
        devices[0]["device_id"],
    )
    assert [(r["from_status"], r["to_status"]) for r in changes] == [(None, "active"), ("active", "failed")]
    configs = await pool.fetchval(
        "SELECT count(*) FROM device.configurations WHERE tenant = 'acme' AND device_id LIKE $1",
        f"{prefix}-%",
    )
    assert configs == 0


async def test_a_cancelled_bulk_import_retracts_the_events_of_its_finished_slices(
    api: httpx.AsyncClient, client: Client, pool: Pool, holds: dict[str, asyncio.Event]
) -> None:
    prefix = new_id("br")
    devices = sensors(prefix, 501)  # the first slice finishes, the second is held
    bulk_id = bulk_id_of(devices)
    gate = await hold(f"provision_batch:{bulk_id}:500")
    accepted = await api.post("/v1/devices:bulk", json={"devices": devices}, headers=AUTH)
    assert accepted.status_code == 202
    await until_entered(f"provision_batch:{bulk_id}:500")
    await eventually(lambda: onboarded_events(pool, prefix), lambda n: n == 500, 60)
    handle = client.get_workflow_handle(accepted.json()["workflow_id"])
    await handle.cancel()
    await until_handled(handle, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    gate.set()
    await eventually(lambda: handle.describe(), lambda d: d.close_time is not None, 60)
    assert await bulk_state(pool, prefix) == (0, 0)
    # subscribers are not left with DeviceOnboarded for 500 devices that were undone
    assert await onboarded_events(pool, prefix) == 0
