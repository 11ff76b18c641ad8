"""Bulk onboarding: one workflow, batched activities, a per-device outcome."""

from __future__ import annotations

import csv
import io
import uuid
from typing import Any

import httpx
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from fleetflow.db import Pool
from tests.support import bearer, eventually

AUTH = bearer("acme")


def devices(prefix: str, count: int) -> list[dict[str, Any]]:
    return [
        {"device_id": f"{prefix}-{i:04d}", "device_type": "sensor", "tags": ["bulk"]} for i in range(count)
    ]


async def finished(api: httpx.AsyncClient, bulk_id: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any]:
        body: dict[str, Any] = (await api.get(f"/v1/bulk-onboardings/{bulk_id}", headers=AUTH)).json()
        return body

    return await eventually(probe, lambda p: p.get("status") in ("completed", "failed"), 60)


async def test_bulk_reports_each_device_and_only_live_ones_get_credentials(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    prefix = f"blk-{uuid.uuid4().hex[:6]}"
    first = await api.post("/v1/devices:bulk", json={"devices": devices(prefix, 3)}, headers=AUTH)
    assert first.status_code == 202, first.text
    assert (await finished(api, first.json()["bulk_id"]))["onboarded"] == 3

    batch = devices(prefix, 25)  # the first 3 are already active: they must fail, not be touched
    accepted = await api.post("/v1/devices:bulk", json={"devices": batch}, headers=AUTH)
    assert accepted.status_code == 202
    again = await api.post("/v1/devices:bulk", json={"devices": batch}, headers=AUTH)
    assert again.status_code == 200 and again.json()["bulk_id"] == accepted.json()["bulk_id"]

    bulk_id = accepted.json()["bulk_id"]
    result = await finished(api, bulk_id)
    assert result["status"] == "completed"
    assert (result["total"], result["onboarded"], result["failed"]) == (25, 22, 3)
    assert sorted(f["index"] for f in result["failures"]) == [0, 1, 2]
    assert all("already registered (active)" in f["reason"] for f in result["failures"])

    untouched = await pool.fetchval(  # owned by the first import's attempt `<bulk id>/<run>`
        """SELECT split_part(onboarding_id, '/', 1) FROM device.devices
           WHERE tenant = 'acme' AND device_id = $1""",
        f"{prefix}-0000",
    )
    assert untouched == first.json()["bulk_id"]
    active = await pool.fetchval(
        """SELECT count(*) FROM device.devices
           WHERE split_part(onboarding_id, '/', 1) = $1 AND status = 'active'""",
        bulk_id,
    )
    events = await pool.fetchval(
        "SELECT count(*) FROM notification.events WHERE source_workflow = $1", accepted.json()["workflow_id"]
    )
    assert (active, events) == (22, 22)

    exported = await api.get(f"/v1/bulk-onboardings/{bulk_id}/credentials", headers=AUTH)
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == 22
    answer = await api.post(
        "/v1/device-contact", json={}, headers={"Authorization": f"Bearer {rows[0]['credential']}"}
    )
    assert answer.status_code == 202 and answer.json()["status"] == "active"


async def test_csv_import_and_its_bad_rows(api: httpx.AsyncClient, pool: Pool) -> None:
    prefix = f"csv-{uuid.uuid4().hex[:6]}"
    good = "device_id,device_type,firmware_version,tags,config\n" + "".join(
        f'{prefix}-{i},thermostat,1.0.{i},a;b,"{{""target_c"": {18 + i}}}"\n' for i in range(4)
    )
    headers = {**AUTH, "Content-Type": "text/csv"}
    accepted = await api.post("/v1/devices:bulk", content=good, headers=headers)
    assert accepted.status_code == 202, accepted.text
    assert (await finished(api, accepted.json()["bulk_id"]))["onboarded"] == 4
    tags = await pool.fetchval(
        "SELECT tags FROM device.devices WHERE tenant = 'acme' AND device_id = $1", f"{prefix}-2"
    )
    assert tags == ["a", "b"]

    bad_config = f'device_id,device_type,config\n{prefix}-x,thermostat,"{{""target_c"": 80}}"\n'
    refused = await api.post("/v1/devices:bulk", content=bad_config, headers=headers)
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["loc"] == ["body", "devices", 0, "config", "target_c"]
    bad_column = f"device_id,device_type,colour\n{prefix}-y,thermostat,red\n"
    refused = await api.post("/v1/devices:bulk", content=bad_column, headers=headers)
    assert refused.status_code == 422 and "colour" in refused.json()["errors"][0]["msg"]
    twice = f"device_id,device_type\n{prefix}-z,sensor\n{prefix}-z,sensor\n"
    refused = await api.post("/v1/devices:bulk", content=twice, headers=headers)
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"][2] == 1
    stored = await pool.fetchval(
        "SELECT count(*) FROM device.devices WHERE device_id IN ($1, $2, $3)",
        f"{prefix}-x",
        f"{prefix}-y",
        f"{prefix}-z",
    )
    assert stored == 0


async def test_bulk_limits(api: httpx.AsyncClient) -> None:
    empty = await api.post("/v1/devices:bulk", json={"devices": []}, headers=AUTH)
    assert empty.status_code == 422 and empty.json()["errors"][0]["loc"] == ["body", "devices"]
    too_many = await api.post("/v1/devices:bulk", json={"devices": devices("big", 10_001)}, headers=AUTH)
    assert too_many.status_code == 422


async def test_malformed_bulk_bodies_are_refused_with_the_field(api: httpx.AsyncClient) -> None:
    # nested deeper than the JSON parser's recursion (8 MiB allows ~4 million levels)
    deep = await api.post(
        "/v1/devices:bulk", content="[" * 100_000, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert deep.status_code == 422, deep.text
    assert deep.json()["errors"][0]["loc"] == ["body"]
    # a CSV row with more fields than its header (an unquoted comma): the line is named
    headers = {**AUTH, "Content-Type": "text/csv"}
    extra = "\ufeffdevice_id,device_type\nok-1,sensor\nbad-1,sensor,red\n"
    refused = await api.post("/v1/devices:bulk", content=extra.encode(), headers=headers)
    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["loc"] == ["body", "line 3"]


async def test_deeply_nested_metadata_or_config_is_refused_with_the_field(api: httpx.AsyncClient) -> None:
    # 300 levels fit the 8 KiB metadata limit, yet pydantic cannot serialise them (it was a 500)
    deep: dict[str, Any] = {}
    for _ in range(300):
        deep = {"a": deep}
    spec = {"device_id": f"deep-{uuid.uuid4().hex[:6]}", "device_type": "sensor"}
    for field in ("metadata", "config"):
        single = await api.post("/v1/devices", json={**spec, field: deep}, headers=AUTH)
        assert single.status_code == 422, single.text
        assert single.json()["errors"][0]["loc"] == ["body", field]
        bulk = await api.post("/v1/devices:bulk", json={"devices": [{**spec, field: deep}]}, headers=AUTH)
        assert bulk.status_code == 422, bulk.text
        assert bulk.json()["errors"][0]["loc"] == ["body", "devices", 0, field]


async def test_bulk_events_are_read_by_the_notification_service_not_carried_in_the_history(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    # two tenants import the same device ids: each tenant's events name its own devices only
    prefix = f"ref-{uuid.uuid4().hex[:6]}"
    runs = {}
    for tenant in ("acme", "globex"):
        auth = bearer(tenant)
        accepted = await api.post("/v1/devices:bulk", json={"devices": devices(prefix, 7)}, headers=auth)
        assert accepted.status_code == 202, accepted.text
        bulk_id = accepted.json()["bulk_id"]

        async def probe(bulk_id: str = bulk_id, auth: dict[str, str] = auth) -> dict[str, Any]:
            body: dict[str, Any] = (await api.get(f"/v1/bulk-onboardings/{bulk_id}", headers=auth)).json()
            return body

        done = await eventually(probe, lambda p: p.get("status") in ("completed", "failed"), 60)
        assert (done["status"], done["onboarded"]) == ("completed", 7)
        runs[tenant] = accepted.json()["workflow_id"]
    for tenant, workflow_id in runs.items():
        recorded = await pool.fetch(
            """SELECT tenant, device_id, event_id FROM notification.events
               WHERE source_workflow = $1 AND type = 'DeviceOnboarded' ORDER BY device_id""",
            workflow_id,
        )
        assert [(r["tenant"], r["device_id"]) for r in recorded] == [
            (tenant, d["device_id"]) for d in devices(prefix, 7)
        ]
        assert all(r["event_id"].startswith(f"{workflow_id}/") for r in recorded)
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        ]
        # one activity a slice reads the devices it records: no event is an input in the history
        assert scheduled == ["device.provision_batch", "notification.record_bulk_onboarded"]
