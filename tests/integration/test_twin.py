"""The device twin: convergence, versions, long-poll, continue-as-new and time travel."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from temporalio.client import Client

from fleetflow.contracts.twin import TwinInput
from fleetflow.temporal import device_search_attributes
from tests.integration.flows import AUTH, active_device
from tests.support import bearer, eventually
from workflows.device_twin import DeviceTwin, twin_id

THERMOSTAT_DEFAULT = {"target_c": 21, "mode": "auto", "report_interval_s": 60}


def device_auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def twin(api: httpx.AsyncClient, device_id: str, **params: str) -> dict[str, Any]:
    response = await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def patch(
    api: httpx.AsyncClient, device_id: str, body: dict[str, Any], version: int | None = None
) -> httpx.Response:
    headers = {**AUTH, **({"If-Match": f'"{version}"'} if version is not None else {})}
    return await api.patch(f"/v1/devices/{device_id}/twin/desired", json=body, headers=headers)


async def test_desired_and_reported_converge(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api)
    start = await twin(api, device_id)
    assert start["desired"] == THERMOSTAT_DEFAULT and start["desired_version"] == 1
    assert start["delta"] == THERMOSTAT_DEFAULT and start["connection"] == "never_seen"

    changed = await patch(api, device_id, {"target_c": 23.5, "mode": None}, version=1)
    assert changed.status_code == 200, changed.text
    assert changed.json()["version"] == 2 and changed.headers["ETag"] == '"2"'
    desired = {"target_c": 23.5, "report_interval_s": 60}

    todo = await api.get("/v1/device/twin/delta", headers=device_auth(credential))
    assert todo.json() == {"delta": desired, "desired_version": 2}
    half = await api.post(
        "/v1/device/twin/reported", json={"reported": {"target_c": 23.5}}, headers=device_auth(credential)
    )
    assert half.status_code == 202 and half.json()["delta"] == {"report_interval_s": 60}
    await api.post(
        "/v1/device/twin/reported",
        json={"reported": {"report_interval_s": 60, "rssi": -70}},
        headers=device_auth(credential),
    )
    done = await twin(api, device_id)
    assert done["delta"] == {} and done["reported_version"] == 2
    assert done["reported"] == {"target_c": 23.5, "report_interval_s": 60, "rssi": -70}
    assert done["connection"] == "online"


async def test_stale_version_invalid_document_and_other_tenants_are_refused(api: httpx.AsyncClient) -> None:
    device_id, _ = await active_device(api)
    assert (await patch(api, device_id, {"target_c": 20}, version=1)).status_code == 200
    stale = await patch(api, device_id, {"target_c": 22}, version=1)
    assert stale.status_code == 412 and "version 2" in stale.json()["detail"]
    bad = await patch(api, device_id, {"target_c": 99})
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["body", "target_c"]
    unknown = await patch(api, device_id, {"fan": "on"})
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["loc"] == ["body", "fan"]
    assert (await twin(api, device_id))["desired"]["target_c"] == 20  # nothing refused was applied
    foreign = await api.get(f"/v1/devices/{device_id}/twin", headers=bearer("globex"))
    assert foreign.status_code == 404
    foreign_patch = await api.patch(
        f"/v1/devices/{device_id}/twin/desired", json={"target_c": 5}, headers=bearer("globex")
    )
    assert foreign_patch.status_code == 404
    read_only = await api.patch(
        f"/v1/devices/{device_id}/twin/desired",
        json={"target_c": 5},
        headers=bearer("acme", ["devices:read"]),
    )
    assert read_only.status_code == 403


async def test_long_poll_returns_when_desired_changes(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api)
    await api.post(
        "/v1/device/twin/reported", json={"reported": THERMOSTAT_DEFAULT}, headers=device_auth(credential)
    )
    assert (await twin(api, device_id))["delta"] == {}

    waiting = asyncio.create_task(
        api.get("/v1/device/twin/delta", params={"wait": 20}, headers=device_auth(credential))
    )
    await asyncio.sleep(0.5)
    assert not waiting.done()  # nothing to do yet: the device is held
    await patch(api, device_id, {"mode": "heat"})
    answer = await waiting
    assert answer.json() == {"delta": {"mode": "heat"}, "desired_version": 2}


async def test_continued_as_new_twin_keeps_state_history_and_past(
    api: httpx.AsyncClient, client: Client
) -> None:
    device_id, _ = await active_device(api, device_type="sensor")
    # restart this device's twin with a tiny history limit, to see it continue as new
    await client.get_workflow_handle(twin_id("acme", device_id)).terminate("test: small history limit")
    await client.start_workflow(
        DeviceTwin.run,
        TwinInput(
            tenant="acme",
            device_id=device_id,
            config_schema={},
            initial_desired={"rate": 0},
            history_limit=60,
        ),
        id=twin_id("acme", device_id),
        task_queue="orchestration",
        search_attributes=device_search_attributes("acme", "twin", device_id),
    )
    marks: dict[int, datetime] = {}
    for rate in range(1, 31):
        response = await patch(api, device_id, {"rate": rate})
        assert response.status_code == 200, response.text
        marks[response.json()["version"]] = datetime.now(UTC)
        await asyncio.sleep(0.01)

    runs = [r async for r in client.list_workflows(f"WorkflowId = '{twin_id('acme', device_id)}'")]
    assert len(runs) >= 4  # the terminated one, then at least three continued-as-new runs
    now = await twin(api, device_id)
    assert now["desired"] == {"rate": 30} and now["desired_version"] == 31

    for version in (2, 9, 17, 25):
        past = await twin(api, device_id, as_of=marks[version].isoformat())
        assert past["desired"] == {"rate": version - 1} and past["desired_version"] == version

    async def changes() -> list[dict[str, Any]]:
        body: list[dict[str, Any]] = (await api.get(f"/v1/devices/{device_id}/history", headers=AUTH)).json()
        return body

    history = await eventually(changes, lambda h: sum(e["type"] == "DesiredStateChanged" for e in h) == 30)
    types = [e["type"] for e in history]
    assert types[:1] == ["DeviceOnboardingStarted"] and "DeviceActivated" in types
    assert all(e["actor"] == "tester" for e in history if e["type"] == "DesiredStateChanged")
    assert [e["time"] for e in history] == sorted(e["time"] for e in history)


async def test_as_of_an_event_id_and_before_the_twin_existed(api: httpx.AsyncClient) -> None:
    before = datetime.now(UTC)
    device_id, _ = await active_device(api)
    await patch(api, device_id, {"target_c": 30})
    current = await twin(api, device_id)
    at_start = await twin(api, device_id, as_of="1")
    assert at_start["desired_version"] == 1 and at_start["desired"] == THERMOSTAT_DEFAULT
    assert current["desired"]["target_c"] == 30
    too_early = await api.get(
        f"/v1/devices/{device_id}/twin", params={"as_of": before.isoformat()}, headers=AUTH
    )
    assert too_early.status_code == 404
    nonsense = await api.get(f"/v1/devices/{device_id}/twin", params={"as_of": "yesterday"}, headers=AUTH)
    assert nonsense.status_code == 422 and nonsense.json()["errors"][0]["loc"] == ["query", "as_of"]


async def test_bulk_devices_get_a_twin_on_first_use(api: httpx.AsyncClient) -> None:
    device_id = f"twinbulk-{uuid.uuid4().hex[:8]}"
    accepted = await api.post(
        "/v1/devices:bulk",
        json={"devices": [{"device_id": device_id, "device_type": "sensor"}]},
        headers=AUTH,
    )
    bulk_id = accepted.json()["bulk_id"]

    async def state() -> str:
        body: dict[str, Any] = (await api.get(f"/v1/bulk-onboardings/{bulk_id}", headers=AUTH)).json()
        return str(body.get("status"))

    await eventually(state, lambda s: s == "completed")
    first = await twin(api, device_id)
    assert first["desired"] == {"report_interval_s": 10, "metrics": ["temperature"]}


async def test_as_of_an_event_before_the_first_or_past_any_number_is_refused(api: httpx.AsyncClient) -> None:
    # event 0 precedes every history (it was an empty replay: 500), and an id of thousands of
    # digits is no event id (int() refuses it past 4,300 digits: 500)
    device_id, _ = await active_device(api)
    await twin(api, device_id)
    none = await api.get(f"/v1/devices/{device_id}/twin", params={"as_of": "0"}, headers=AUTH)
    assert none.status_code == 404, none.text
    huge = await api.get(f"/v1/devices/{device_id}/twin", params={"as_of": "9" * 5000}, headers=AUTH)
    assert huge.status_code == 422 and huge.json()["errors"][0]["loc"] == ["query", "as_of"], huge.text
