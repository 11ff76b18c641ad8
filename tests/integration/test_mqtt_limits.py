"""What one device's credential (or none) can do to the MQTT gateway: the same device id in two
tenants stays apart, a device's readings meet its tenant's rates, its subscriptions are bounded,
and an unauthenticated socket cannot send a large packet."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.flows import active_device
from tests.integration.mqtt_support import Device, GatewayProcess, gateway_process
from tests.support import bearer, eventually

QUOTA_EXCEEDED = 0x97


@pytest.fixture(scope="module")
def gateway(settings: Settings, pool: Pool) -> Iterator[GatewayProcess]:
    yield from gateway_process(settings)


async def test_the_same_device_id_in_two_tenants_stays_apart(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    device_id = f"twin-{uuid.uuid4().hex[:8]}"
    _, acme_token = await active_device(api, device_id=device_id, auth=bearer("acme"))
    _, globex_token = await active_device(api, device_id=device_id, auth=bearer("globex"))
    acme = Device(gateway.port, device_id, acme_token)
    globex = Device(gateway.port, device_id, globex_token)
    try:
        assert await acme.connect() == 0
        assert await globex.connect() == 0  # not a takeover of acme's connection
        for tenant, device, value in (("acme", acme, 1), ("globex", globex, 2)):
            topic = f"tenants/{tenant}/devices/{device_id}/telemetry"
            assert (
                await device.puback(device.publish(topic, json.dumps({"metric": "t", "value": value}))) == 0
            )
        # acme's device may not publish as globex's device of the same id
        other = f"tenants/globex/devices/{device_id}/telemetry"
        assert await acme.puback(acme.publish(other, json.dumps({"metric": "t", "value": 3}))) == 0x87
        assert acme.disconnects.empty() and globex.disconnects.empty()
    finally:
        acme.close()
        globex.close()

    async def values(tenant: str) -> list[float]:
        rows = await pool.fetch(
            "SELECT value FROM data.readings WHERE tenant = $1 AND device_id = $2", tenant, device_id
        )
        return [r["value"] for r in rows]

    assert await eventually(lambda: values("acme"), bool) == [1.0]
    assert await eventually(lambda: values("globex"), bool) == [2.0]


async def test_readings_over_the_device_rate_are_refused(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    tenant = f"q{uuid.uuid4().hex[:8]}"
    operator = bearer(tenant)
    limits = {"device_readings_per_s": 1, "burst_s": 1}
    r = await api.put(f"/v1/tenants/{tenant}/profile", json=limits, headers=operator)
    assert r.status_code == 200, r.text
    device_id, token = await active_device(api, auth=operator)
    device = Device(gateway.port, device_id, token)
    try:
        assert await device.connect() == 0
        topic = f"tenants/{tenant}/devices/{device_id}/telemetry"
        batch = json.dumps([{"metric": "t", "value": i} for i in range(20)])
        codes = [await device.puback(device.publish(topic, batch)) for _ in range(3)]
        assert QUOTA_EXCEEDED in codes, codes
    finally:
        device.close()


async def test_subscriptions_are_bounded(api: httpx.AsyncClient, gateway: GatewayProcess) -> None:
    device_id, token = await active_device(api)
    device = Device(gateway.port, device_id, token)
    try:
        assert await device.connect() == 0
        codes = [await device.subscribe(f"tenants/acme/devices/{device_id}/x{i}") for i in range(40)]
        assert codes[0] == [1] and codes[-1] == [QUOTA_EXCEEDED]
    finally:
        device.close()


async def test_a_large_packet_before_connect_closes_the_socket(gateway: GatewayProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        # a CONNECT announcing 1 MiB: refused before it is read, no CONNACK
        writer.write(bytes([0x10, 0x80, 0x80, 0x40]) + b"\x00" * 1024)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 30) == b""
    finally:
        writer.close()


async def test_every_publish_counts_against_the_device_requests_rate(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    """An MQTT message is a request of the device, as an HTTP request is: twin reports too."""
    tenant = f"q{uuid.uuid4().hex[:8]}"
    operator = bearer(tenant)
    limits = {"device_requests_per_s": 1, "burst_s": 1}
    r = await api.put(f"/v1/tenants/{tenant}/profile", json=limits, headers=operator)
    assert r.status_code == 200, r.text
    device_id, token = await active_device(api, auth=operator)
    device = Device(gateway.port, device_id, token)
    try:
        assert await device.connect() == 0
        topic = f"tenants/{tenant}/devices/{device_id}/twin/reported"
        # the first one has the gateway read the tenant's limits; the next ones come at once
        await device.puback(device.publish(topic, json.dumps({"n": 0})))
        mids = [device.publish(topic, json.dumps({"n": i})) for i in range(1, 11)]
        codes = [await device.puback(mid) for mid in mids]
        assert QUOTA_EXCEEDED in codes, codes
    finally:
        device.close()
