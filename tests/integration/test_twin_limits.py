"""Twin document limits: refused before they reach the workflow, bounded history events, and
concurrent time travel on one run."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from temporalio.client import Client

from api.limits import TWIN_DOCUMENT_MAX_BYTES
from fleetflow.contracts.twin import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_KEYS, TwinInput
from fleetflow.temporal import device_search_attributes
from fleetflow.twin_state import size_of
from tests.integration.flows import AUTH, active_device
from workflows.device_twin import DeviceTwin, twin_id

MAX_EVENT_BYTES = 256 * 1024


def device_auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def open_type(api: httpx.AsyncClient, padding: int = 0) -> str:
    """A device type of acme that allows any object (its schema padded to `padding` bytes)."""
    name = f"open-{uuid.uuid4().hex[:8]}"
    schema: dict[str, Any] = {"type": "object"}
    if padding:
        schema["description"] = "s" * (padding - size_of(schema) - len(',"description":""'))
    body = {"name": name, "config_schema": schema}
    response = await api.put(f"/v1/device-types/{name}", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    return name


def blob(field: str, size: int) -> dict[str, str]:
    """A document of exactly `size` bytes of compact JSON."""
    return {field: "x" * (size - len(f'{{"{field}":""}}'))}


def nested(depth: int) -> dict[str, Any]:
    document: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        document = {"a": document}
    return document


async def test_a_3_mib_report_is_413_and_the_twin_keeps_working(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api, device_type=await open_type(api))
    huge = await api.post(
        "/v1/device/twin/reported",
        json={"reported": blob("dump", 3 * 1024 * 1024)},
        headers=device_auth(credential),
    )
    assert huge.status_code == 413, huge.text
    assert f"at most {TWIN_DOCUMENT_MAX_BYTES} bytes" in huge.json()["detail"], huge.text

    fine = await api.post(
        "/v1/device/twin/reported", json={"reported": {"rssi": -60}}, headers=device_auth(credential)
    )
    assert fine.status_code == 202, fine.text
    changed = await api.patch(f"/v1/devices/{device_id}/twin/desired", json={"mode": "eco"}, headers=AUTH)
    assert changed.status_code == 200, changed.text
    now = (await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH)).json()
    assert now["reported"] == {"rssi": -60} and now["desired"] == {"mode": "eco"}


async def test_too_deep_too_wide_and_too_large_documents_name_the_limit(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api, device_type=await open_type(api))
    url = f"/v1/devices/{device_id}/twin/desired"
    deep = await api.patch(url, json=nested(MAX_DOCUMENT_DEPTH + 1), headers=AUTH)
    assert deep.status_code == 422 and deep.json()["errors"][0]["type"] == "limit.depth", deep.text
    assert f"{MAX_DOCUMENT_DEPTH} levels" in deep.json()["errors"][0]["msg"]
    # deeper than Python's JSON parser recurses: still a 422, not a 500
    abyss = await api.patch(url, content=b"[" * 40_000 + b"]" * 40_000, headers=AUTH)
    assert abyss.status_code in (413, 422), abyss.text
    wide = await api.patch(url, json={f"k{i}": i for i in range(MAX_DOCUMENT_KEYS + 1)}, headers=AUTH)
    assert wide.status_code == 422 and wide.json()["errors"][0]["type"] == "limit.keys", wide.text
    large = await api.patch(url, json=blob("big", MAX_DOCUMENT_BYTES + 1), headers=AUTH)
    assert large.status_code == 413 and large.json()["errors"][0]["type"] == "limit.bytes", large.text
    # two patches each within the limit, whose merge is not: the twin's validator refuses the second
    half = MAX_DOCUMENT_BYTES // 2 + 100
    assert (await api.patch(url, json=blob("a", half), headers=AUTH)).status_code == 200
    merged = await api.patch(url, json=blob("b", half), headers=AUTH)
    assert merged.status_code == 413 and "desired" in merged.json()["errors"][0]["msg"], merged.text
    # desired + reported together: the device's report is refused before it is signalled
    report = await api.post(
        "/v1/device/twin/reported",
        json={"reported": blob("r", MAX_DOCUMENT_BYTES - 10)},
        headers=device_auth(credential),
    )
    assert report.status_code == 413, report.text
    assert "desired + reported" in report.json()["errors"][0]["msg"]
    deep_report = await api.post(
        "/v1/device/twin/reported",
        json={"reported": nested(MAX_DOCUMENT_DEPTH + 1)},
        headers=device_auth(credential),
    )
    assert deep_report.status_code == 422 and deep_report.json()["errors"][0]["loc"] == ["body", "reported"]
    now = (await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH)).json()
    assert set(now["desired"]) == {"a"} and now["reported_version"] == 0  # nothing refused was applied


async def test_no_history_event_of_the_largest_twin_passes_256_kib(
    api: httpx.AsyncClient, client: Client
) -> None:
    # the largest schema, patches and reports the API accepts, and a continue-as-new carrying them
    kind = await open_type(api, padding=32 * 1024 - 64)
    device_id, credential = await active_device(api, device_type=kind)
    wid = twin_id("acme", device_id)
    await client.get_workflow_handle(wid).terminate("test: small history limit")
    types = (await api.get("/v1/device-types", headers=AUTH)).json()
    schema = next(t["config_schema"] for t in types if t["name"] == kind)
    await client.start_workflow(
        DeviceTwin.run,
        TwinInput(tenant="acme", device_id=device_id, config_schema=schema, history_limit=50),
        id=wid,
        task_queue="orchestration",
        search_attributes=device_search_attributes("acme", "twin", device_id),
    )
    url = f"/v1/devices/{device_id}/twin/desired"
    accepted: dict[int, int] = {}
    for size in (MAX_DOCUMENT_BYTES - 200, 256 * 1024, 1024 * 1024):
        for n in range(2):  # a patch of that size, twice (replacing the field: the document stays that size)
            response = await api.patch(url, json=blob("d", size), headers=AUTH)
            if response.status_code == 200:
                accepted[size] = n + 1
    assert accepted.get(MAX_DOCUMENT_BYTES - 200) == 2
    reported_size = 32 * 1024 - 400  # what is left of the twin's 96 KiB
    for size in (reported_size, 256 * 1024, 1024 * 1024):
        await api.post(
            "/v1/device/twin/reported", json={"reported": blob("r", size)}, headers=device_auth(credential)
        )
    current = (await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH)).json()
    assert current["reported"] == blob("r", reported_size)

    async def runs() -> list[str]:
        return [r.run_id async for r in client.list_workflows(f"WorkflowId = '{wid}'")]

    first_runs = len(await runs())
    for i in range(40):  # small patches until the twin continues as new, carrying the large state
        await api.patch(url, json={"n": i}, headers=AUTH)
        if len(await runs()) > first_runs:
            break
    assert len(await runs()) > first_runs
    assert (await api.patch(url, json={"n": -1}, headers=AUTH)).status_code == 200  # the new run answers

    largest = 0
    for run_id in await runs():
        history = await client.get_workflow_handle(wid, run_id=run_id).fetch_history()
        for event in history.events:
            assert event.ByteSize() <= MAX_EVENT_BYTES, (run_id, event.event_id, event.ByteSize())
            largest = max(largest, event.ByteSize())
    assert largest > MAX_DOCUMENT_BYTES  # the test did carry the largest documents


async def test_concurrent_time_travel_on_one_run_reads_each_its_own_state(api: httpx.AsyncClient) -> None:
    device_id, _ = await active_device(api, device_type=await open_type(api))
    marks: dict[int, datetime] = {}
    for n in range(1, 9):
        response = await api.patch(f"/v1/devices/{device_id}/twin/desired", json={"n": n}, headers=AUTH)
        marks[response.json()["version"]] = datetime.now(UTC)
        await asyncio.sleep(0.01)
    answers = await asyncio.gather(
        *(
            api.get(f"/v1/devices/{device_id}/twin", params={"as_of": at.isoformat()}, headers=AUTH)
            for at in marks.values()
        )
    )
    for version, answer in zip(marks, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["desired_version"] == version and answer.json()["desired"] == {"n": version}
