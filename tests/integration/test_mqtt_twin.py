"""The twin over MQTT: desired (retained) at SUBSCRIBE, delta pushed on a change of desired,
reported publishes reach the twin."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.flows import AUTH, active_device
from tests.integration.mqtt_support import Device, GatewayProcess, gateway_process
from tests.support import eventually


@pytest.fixture(scope="module")
def gateway(settings: Settings, pool: Pool) -> Iterator[GatewayProcess]:
    yield from gateway_process(settings)


async def _message(device: Device, topic: str, timeout: float = 30) -> dict[str, Any]:
    while True:
        message = await asyncio.to_thread(device.messages.get, True, timeout)
        if message.topic == topic:
            body: dict[str, Any] = json.loads(message.payload)
            return body


async def test_desired_is_retained_and_changes_are_pushed(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, token = await active_device(api)
    base = f"tenants/acme/devices/{device_id}/twin"
    r = await api.patch(f"/v1/devices/{device_id}/twin/desired", json={"target_c": 10}, headers=AUTH)
    assert r.status_code == 200, r.text
    device = Device(gateway.port, device_id, token)
    try:
        assert await device.connect() == 0
        assert await device.subscribe(f"{base}/desired") == [1]
        first = await _message(device, f"{base}/desired")
        assert first["desired"]["target_c"] == 10
        assert await device.subscribe(f"{base}/delta") == [1]
        await _message(device, f"{base}/delta")  # the delta as it is now
        r = await api.patch(f"/v1/devices/{device_id}/twin/desired", json={"target_c": 20}, headers=AUTH)
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        pushed = await _message(device, f"{base}/delta")
        while pushed["version"] < version:
            pushed = await _message(device, f"{base}/delta")
        assert pushed["delta"]["target_c"] == 20 and pushed["version"] == version
        # the device applies it and reports over MQTT
        mid = device.publish(f"{base}/reported", json.dumps(pushed["delta"]))
        assert await device.puback(mid) == 0

        async def twin() -> dict[str, Any]:
            body: dict[str, Any] = (await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH)).json()
            return body

        await eventually(twin, lambda t: t["reported"].get("target_c") == 20 and t["delta"] == {})
        bad = device.publish(f"{base}/reported", b"[1, 2]")
        assert await device.puback(bad) == 0x99
    finally:
        device.close()


async def test_a_change_of_reported_pushes_the_new_delta(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    """The delta changes when reported does (over HTTP or MQTT): it is pushed then too, and not
    when a report leaves it as it was."""
    device_id, token = await active_device(api)
    base = f"tenants/acme/devices/{device_id}/twin"
    r = await api.patch(
        f"/v1/devices/{device_id}/twin/desired", json={"target_c": 10, "mode": "heat"}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    device = Device(gateway.port, device_id, token)
    try:
        assert await device.connect() == 0
        assert await device.subscribe(f"{base}/delta") == [1]
        first = await _message(device, f"{base}/delta")
        assert first["delta"]["target_c"] == 10 and first["delta"]["mode"] == "heat"
        # reported over HTTP (the device's credential): the delta shrinks and is pushed
        r = await api.post(
            "/v1/device/twin/reported",
            json={"reported": {"target_c": 10}},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 202, r.text
        pushed = (await _message(device, f"{base}/delta"))["delta"]
        assert "target_c" not in pushed and pushed["mode"] == "heat"
        # a report that does not change the delta pushes nothing; one over MQTT that does, does
        assert await device.puback(device.publish(f"{base}/reported", json.dumps({"other": 1}))) == 0
        assert await device.puback(device.publish(f"{base}/reported", json.dumps({"mode": "heat"}))) == 0
        # the next push is this one's (the report of "other" pushed nothing)
        assert (await _message(device, f"{base}/delta"))["delta"] == {
            k: v for k, v in pushed.items() if k != "mode"
        }
    finally:
        device.close()
