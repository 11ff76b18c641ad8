"""The device's long-poll is held by the twin (an update that completes on a change), one per device."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from fleetflow.contracts.twin import TwinInput, WaitForDelta
from fleetflow.settings import Settings
from fleetflow.temporal import device_search_attributes
from tests.integration.flows import AUTH, active_device
from tests.integration.test_api_fuzz import start_api
from tests.support import bearer, eventually, free_port
from workflows.device_twin import DeviceTwin, twin_id

THERMOSTAT_DEFAULT = {"target_c": 21, "mode": "auto", "report_interval_s": 60}


def device_auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def waits_held(client: Client, workflow_id: str) -> int:
    """How many wait_for_delta updates the twin's current run has accepted."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    accepted = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    return sum(
        e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name == "wait_for_delta"
        for e in history.events
        if e.event_type == accepted
    )


async def test_one_long_poll_per_device_and_it_ends_on_a_change(
    api: httpx.AsyncClient, client: Client
) -> None:
    device_id, credential = await active_device(api)
    wid = twin_id("acme", device_id)
    await api.post(
        "/v1/device/twin/reported", json={"reported": THERMOSTAT_DEFAULT}, headers=device_auth(credential)
    )
    first = asyncio.create_task(
        api.get("/v1/device/twin/delta", params={"wait": 30}, headers=device_auth(credential))
    )
    await eventually(lambda: waits_held(client, wid), lambda n: n == 1)  # the twin holds it: no polling

    second = await api.get("/v1/device/twin/delta", params={"wait": 30}, headers=device_auth(credential))
    assert second.status_code == 429 and second.headers["Retry-After"] == "30"
    # another API process asking for the same device is refused by the twin itself (and costs no event)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await client.get_workflow_handle(wid).execute_update(
            DeviceTwin.wait_for_delta, WaitForDelta(tenant="acme", device_id=device_id, timeout_s=5)
        )
    assert isinstance(refused.value.cause, ApplicationError) and refused.value.cause.type == "WaiterBusy"
    # nor may another device, or the same device id of another tenant, wait on this twin
    with pytest.raises(WorkflowUpdateFailedError) as foreign:
        await client.get_workflow_handle(wid).execute_update(
            DeviceTwin.wait_for_delta, WaitForDelta(tenant="globex", device_id=device_id, timeout_s=5)
        )
    assert isinstance(foreign.value.cause, ApplicationError) and foreign.value.cause.type == "Forbidden"
    assert not first.done()

    changed = await api.patch(f"/v1/devices/{device_id}/twin/desired", json={"mode": "heat"}, headers=AUTH)
    assert changed.status_code == 200
    answer = await first
    assert answer.status_code == 200 and answer.json() == {"delta": {"mode": "heat"}, "desired_version": 2}

    # the waiter is released: once converged, the device may wait again (and its wait ends empty)
    done = {"reported": {"mode": "heat"}}
    await api.post("/v1/device/twin/reported", json=done, headers=device_auth(credential))
    again = await api.get("/v1/device/twin/delta", params={"wait": 2}, headers=device_auth(credential))
    assert again.status_code == 200 and again.json() == {"delta": {}, "desired_version": 2}
    assert await waits_held(client, wid) == 2


async def test_a_long_poll_survives_the_twin_continuing_as_new(
    api: httpx.AsyncClient, client: Client
) -> None:
    device_id, credential = await active_device(api, device_type="sensor")
    wid = twin_id("acme", device_id)
    await client.get_workflow_handle(wid).terminate("test: small history limit")
    config = {"report_interval_s": 10}
    await client.start_workflow(
        DeviceTwin.run,
        TwinInput(
            tenant="acme",
            device_id=device_id,
            config_schema={},
            initial_desired=config,
            initial_reported=config,
            history_limit=50,
        ),
        id=wid,
        task_queue="orchestration",
        search_attributes=device_search_attributes("acme", "twin", device_id),
    )
    waiting = asyncio.create_task(
        api.get("/v1/device/twin/delta", params={"wait": 60}, headers=device_auth(credential))
    )
    await eventually(lambda: waits_held(client, wid), lambda n: n == 1)
    first_run = (await client.get_workflow_handle(wid).describe()).run_id

    async def run_id() -> str:
        return (await client.get_workflow_handle(wid).describe()).run_id

    for rssi in range(60):  # reports that change no delta, until the twin continues as new
        report = {"reported": {"rssi": -rssi}}
        sent = await api.post("/v1/device/twin/reported", json=report, headers=device_auth(credential))
        assert sent.status_code == 202, sent.text
        if await run_id() != first_run:
            break
    assert await run_id() != first_run
    # the waiting device was handed to the new run: it is still held, there
    await eventually(lambda: waits_held(client, wid), lambda n: n == 1)
    assert not waiting.done()

    url = f"/v1/devices/{device_id}/twin/desired"
    changed = await api.patch(url, json={"report_interval_s": 20}, headers=AUTH)
    assert changed.status_code == 200, changed.text
    answer: dict[str, Any] = (await waiting).json()
    assert answer == {"delta": {"report_interval_s": 20}, "desired_version": 2}


async def test_a_device_that_hangs_up_may_wait_again_at_once(api: httpx.AsyncClient, client: Client) -> None:
    device_id, credential = await active_device(api)
    wid = twin_id("acme", device_id)
    await api.post(
        "/v1/device/twin/reported", json={"reported": THERMOSTAT_DEFAULT}, headers=device_auth(credential)
    )
    hung_up = asyncio.create_task(
        api.get("/v1/device/twin/delta", params={"wait": 60}, headers=device_auth(credential))
    )
    await eventually(lambda: waits_held(client, wid), lambda n: n == 1)
    hung_up.cancel()  # the device's connection drops while the twin holds its wait

    async def wait_again() -> int:
        response = await api.get("/v1/device/twin/delta", params={"wait": 1}, headers=device_auth(credential))
        return response.status_code

    # released by the hang-up, not by its 60 s running out
    assert await eventually(wait_again, lambda status: status == 200) == 200


async def test_a_device_hanging_up_on_a_real_server_is_no_server_error(
    settings: Settings, workers: None, client: Client, tmp_path: Path
) -> None:
    # uvicorn tells the route of a dropped connection (http.disconnect): the route raised, which
    # logged every routine hang-up as an ERROR with a traceback ("Exception in ASGI application",
    # and "Task exception was never retrieved" for the cancelled update call)
    port, log = free_port(), tmp_path / "api.log"
    process = start_api(settings, port, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            await eventually(partial(_started, http), bool, timeout_s=60)
            device_id, credential = await active_device(http, auth=bearer("hangup"))
            device = device_auth(credential)
            await http.post("/v1/device/twin/reported", json={"reported": THERMOSTAT_DEFAULT}, headers=device)
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET /v1/device/twin/delta?wait=60 HTTP/1.1\r\nHost: api\r\n"
                f"Authorization: Bearer {credential}\r\n\r\n".encode()
            )
            await writer.drain()
            await eventually(lambda: waits_held(client, twin_id("hangup", device_id)), lambda n: n == 1)
            writer.close()  # the device's connection drops while the twin holds its wait

            async def wait_again() -> int:
                response = await http.get("/v1/device/twin/delta", params={"wait": 1}, headers=device)
                return response.status_code

            assert await eventually(wait_again, lambda status: status == 200) == 200
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)
    errors = [line for line in log.read_text(errors="replace").splitlines() if " ERROR " in line]
    assert errors == [], errors


async def _started(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/openapi.json")).status_code == 200
    except httpx.TransportError:
        return False
