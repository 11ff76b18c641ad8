"""MQTT CONNECT: a device's credential admits it; anything else is refused; presence follows
the connection; a revocation disconnects a connected device."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from activities.devices import DeviceService
from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.flows import AUTH, active_device, new_id, onboard, progress_until
from tests.integration.mqtt_support import Device, GatewayProcess, gateway_process, raw_connack_311
from tests.support import bearer, eventually

NOT_AUTHORIZED_5 = 0x87
NOT_AUTHORIZED_311 = 5
SESSION_TAKEN_OVER_5 = 0x8E


@pytest.fixture(scope="module")
def gateway(settings: Settings, pool: Pool) -> Iterator[GatewayProcess]:
    yield from gateway_process(settings)


async def _connection(api: httpx.AsyncClient, device_id: str) -> str:
    twin = (await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH)).json()
    return str(twin["connection"])


@pytest.mark.parametrize("v5", [True, False])
async def test_wrong_credentials_are_refused(
    api: httpx.AsyncClient, gateway: GatewayProcess, v5: bool
) -> None:
    device_id, token = await active_device(api)
    other_id, other_token = await active_device(api)
    refused = NOT_AUTHORIZED_5 if v5 else NOT_AUTHORIZED_311
    cases = [
        (device_id, "not-a-jwt", device_id, device_id),
        (device_id, other_token, device_id, device_id),  # another device's credential
        (device_id, token, other_id, device_id),  # someone else's username
        (device_id, token, device_id, other_id),  # someone else's client id
    ]
    for dev, password, username, client_id in cases:
        if not v5:  # as on the wire (paho shows a 3.1.1 return code as the 5.0 reason)
            assert await raw_connack_311(gateway.port, client_id, username, password) == refused
            continue
        client = Device(gateway.port, dev, password, v5=v5, username=username, client_id=client_id)
        try:
            assert await client.connect() == refused
        finally:
            client.close()
    ok = Device(gateway.port, device_id, token, v5=v5)
    try:
        assert await ok.connect() == 0
    finally:
        ok.close()


async def test_revoked_and_decommissioned_devices_are_refused(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    device_id, token = await active_device(api)
    await pool.execute("UPDATE device.credentials SET revoked_at = now() WHERE device_id = $1", device_id)
    client = Device(gateway.port, device_id, token)
    try:
        assert await client.connect() == NOT_AUTHORIZED_5
    finally:
        client.close()
    retired_id, retired_token = await active_device(api)
    response = await api.post(f"/v1/devices/{retired_id}:decommission", json={}, headers=AUTH)
    assert response.status_code < 300, response.text

    async def refused() -> bool:
        code = await raw_connack_311(gateway.port, retired_id, retired_id, retired_token)
        return code == NOT_AUTHORIZED_311

    await eventually(refused, bool)


async def test_revocation_disconnects_a_connected_device(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    device_id, token = await active_device(api)
    client = Device(gateway.port, device_id, token)
    try:
        assert await client.connect() == 0
        await pool.execute("UPDATE device.credentials SET revoked_at = now() WHERE device_id = $1", device_id)
        # the NOTIFY reaches the gateway at once; the limit is the 5 s, with room for a slow box
        assert await client.next_disconnect(timeout=10) == NOT_AUTHORIZED_5
    finally:
        client.close()


async def test_presence_follows_connect_and_disconnect(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, token = await active_device(api)
    client = Device(gateway.port, device_id, token)
    assert await client.connect() == 0
    await eventually(lambda: _connection(api, device_id), lambda c: c == "online")
    client.close()
    await eventually(lambda: _connection(api, device_id), lambda c: c == "offline")

    async def types() -> list[str]:
        events = (await api.get("/v1/events", params={"device_id": device_id}, headers=AUTH)).json()
        return [e["type"] for e in (events["items"] if isinstance(events, dict) else events)]

    # the event is recorded just after the presence row is written
    await eventually(types, lambda t: "DeviceConnected" in t and "DeviceDisconnected" in t)


async def test_keep_alive_expiry_sets_offline(api: httpx.AsyncClient, gateway: GatewayProcess) -> None:
    device_id, token = await active_device(api)
    client = Device(gateway.port, device_id, token, keep_alive=1)
    assert await client.connect() == 0
    await eventually(lambda: _connection(api, device_id), lambda c: c == "online")
    client.client.loop_stop()  # the client goes silent: no PINGREQ any more, socket left open
    try:
        await eventually(lambda: _connection(api, device_id), lambda c: c == "offline")
    finally:
        client.client.disconnect()


async def test_first_connect_is_first_contact(api: httpx.AsyncClient, gateway: GatewayProcess) -> None:
    device_id = new_id()
    assert (await onboard(api, device_id)).status_code == 202
    waiting = await progress_until(api, device_id, "awaiting_first_contact")
    client = Device(gateway.port, device_id, waiting["credential"])
    try:
        assert await client.connect() == 0
        await progress_until(api, device_id, "completed")
    finally:
        client.close()
    device = (await api.get(f"/v1/devices/{device_id}", headers=AUTH)).json()
    assert device["status"] == "active"


async def test_the_sweep_checks_every_credential_in_one_query(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool, settings: Settings
) -> None:
    """The gateway's periodic re-check asks once for all its connections: each answer is the
    credential's own, also for the same device id in two tenants."""
    device_id = new_id()
    _, acme = await active_device(api, device_id=device_id, auth=bearer("acme"))
    _, globex = await active_device(api, device_id=device_id, auth=bearer("globex"))
    jtis = {
        r["tenant"]: r["jti"]
        for r in await pool.fetch(
            "SELECT tenant, jti FROM device.credentials WHERE device_id = $1", device_id
        )
    }
    await pool.execute("UPDATE device.credentials SET revoked_at = now() WHERE jti = $1", jtis["globex"])
    devices = DeviceService(pool, settings)
    held = [
        ("acme", device_id, jtis["acme"], acme),
        ("globex", device_id, jtis["globex"], globex),  # revoked
        ("globex", device_id, jtis["acme"], acme),  # acme's credential shown as globex's
        ("acme", device_id, jtis["acme"], globex),  # another token under acme's jti
    ]
    assert await devices.credentials_active(held) == [True, False, False, False]
    assert await devices.credentials_active([]) == []


async def test_a_connection_to_another_gateway_takes_the_device_over(
    api: httpx.AsyncClient, gateway: GatewayProcess, settings: Settings
) -> None:
    """Two MQTT processes, one device: its newer connection closes the older one (5.0: reason
    0x8E), as a second CONNECT to the same process does, and the device stays online."""
    other = GatewayProcess(settings)
    other.start()
    device_id, token = await active_device(api)
    first = Device(gateway.port, device_id, token)
    first.client.reconnect_delay_set(60, 120)  # no reconnect during the test (it would take it back)
    second = Device(other.port, device_id, token)
    try:
        assert await first.connect() == 0
        await eventually(lambda: _connection(api, device_id), lambda c: c == "online")
        assert await second.connect() == 0
        assert await first.next_disconnect(timeout=30) == SESSION_TAKEN_OVER_5
        assert second.disconnects.empty()
        assert await _connection(api, device_id) == "online"
    finally:
        first.close()
        second.close()
        other.stop()


async def test_the_last_will_is_published_when_the_connection_ends_unclean(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    """A will on the device's own telemetry topic is stored when its keep-alive expires, not
    after a DISCONNECT; a will on another device's topic refuses the CONNECT."""
    device_id, token = await active_device(api)
    topic = f"tenants/acme/devices/{device_id}/telemetry"
    silent = Device(gateway.port, device_id, token, keep_alive=1)
    silent.client.will_set(topic, json.dumps({"metric": "will", "value": 1}), qos=1)
    assert await silent.connect() == 0
    silent.client.loop_stop()  # silent: no PINGREQ, socket left open
    try:

        async def wills() -> list[float]:
            rows = await pool.fetch(
                "SELECT value FROM data.readings WHERE device_id = $1 AND metric = 'will'", device_id
            )
            return [r["value"] for r in rows]

        assert await eventually(wills, bool) == [1.0]
    finally:
        silent.client.disconnect()
    polite = Device(gateway.port, device_id, token)
    polite.client.will_set(topic, json.dumps({"metric": "will", "value": 2}), qos=1)
    assert await polite.connect() == 0
    polite.close()  # DISCONNECT: no will
    other, _ = await active_device(api)
    intruder = Device(gateway.port, device_id, token)
    intruder.client.will_set(f"tenants/acme/devices/{other}/telemetry", '{"metric": "will", "value": 3}')
    try:
        assert await intruder.connect() == NOT_AUTHORIZED_5
    finally:
        intruder.close()
    await asyncio.sleep(3)
    assert await wills() == [1.0]
    other_rows = await pool.fetch("SELECT 1 FROM data.readings WHERE device_id = $1", other)
    assert other_rows == []
