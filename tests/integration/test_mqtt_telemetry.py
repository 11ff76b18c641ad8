"""MQTT telemetry: stored through the same durable pipeline as HTTP, once each across
redelivery and a SIGKILL of the gateway; confined to the device's own topics; bad payloads
counted in the quarantine view while the connection stays up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from fleetflow.db import Pool
from fleetflow.settings import Settings
from gateway import codec
from tests.integration.flows import AUTH, active_device
from tests.integration.mqtt_support import Device, GatewayProcess, gateway_process
from tests.support import eventually

NOT_AUTHORIZED = 0x87
PAYLOAD_INVALID = 0x99


@pytest.fixture(scope="module")
def gateway(settings: Settings, pool: Pool) -> Iterator[GatewayProcess]:
    yield from gateway_process(settings)


def telemetry(device_id: str, tenant: str = "acme") -> str:
    return f"tenants/{tenant}/devices/{device_id}/telemetry"


async def stored(pool: Pool, device_id: str) -> list[float]:
    rows = await pool.fetch(
        "SELECT value FROM data.readings WHERE tenant = 'acme' AND device_id = $1 ORDER BY value", device_id
    )
    return [r["value"] for r in rows]


async def test_three_payload_shapes_are_stored(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    device_id, token = await active_device(api)
    client = Device(gateway.port, device_id, token)
    try:
        assert await client.connect() == 0
        now = datetime.now(UTC).isoformat()
        batch = {"batch_id": "b-1", "readings": [{"metric": "t", "value": 4, "ts": now}]}
        payloads = [
            {"metric": "t", "value": 1},
            [{"metric": "t", "value": 2, "ts": now}, {"metric": "h", "value": 3}],
            batch,
            batch,  # the same batch again: acknowledged, stored once
        ]
        for payload in payloads:
            assert await client.puback(client.publish(telemetry(device_id), json.dumps(payload))) == 0
        # the batch id again with other readings: refused, nothing dropped silently or stored
        reused = {"batch_id": "b-1", "readings": [{"metric": "t", "value": 5, "ts": now}]}
        assert await client.puback(client.publish(telemetry(device_id), json.dumps(reused))) == 0x99
    finally:
        client.close()
    await eventually(lambda: stored(pool, device_id), lambda v: len(v) >= 4)
    await asyncio.sleep(1)
    assert await stored(pool, device_id) == [1.0, 2.0, 3.0, 4.0]


async def test_a_batch_id_sent_over_http_and_mqtt_with_the_same_readings_is_stored_once(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    # a device's retry over the other transport (the same credential, so the same batch id
    # owner): a duplicate whichever came first; other readings under the id are refused on both
    device_id, token = await active_device(api)
    at = datetime.now(UTC).replace(microsecond=250000) - timedelta(minutes=1)
    local = at.astimezone(timezone(timedelta(hours=1))).isoformat()

    def batch(batch_id: str, value: float) -> dict[str, Any]:
        readings = [
            {"device_id": device_id, "metric": "t", "value": value, "ts": local},
            {"device_id": device_id, "metric": "h", "value": 1e16, "ts": at.isoformat()},
        ]
        return {"batch_id": batch_id, "readings": readings}

    async def over_http(body: dict[str, Any]) -> httpx.Response:
        return await api.post("/v1/telemetry", json=body, headers={"Authorization": f"Bearer {token}"})

    client = Device(gateway.port, device_id, token)
    try:
        assert await client.connect() == 0
        first = await over_http(batch("h-1", 4))
        assert (first.status_code, first.json()["duplicate"]) == (202, False)
        assert await client.puback(client.publish(telemetry(device_id), json.dumps(batch("h-1", 4)))) == 0
        assert await client.puback(client.publish(telemetry(device_id), json.dumps(batch("m-1", 0.3)))) == 0
        again = await over_http(batch("m-1", 0.3))
        assert (again.status_code, again.json()["duplicate"]) == (202, True)
        other = batch("h-1", 5)
        assert await client.puback(client.publish(telemetry(device_id), json.dumps(other))) == PAYLOAD_INVALID
        assert (await over_http(batch("m-1", 0.4))).status_code == 409
    finally:
        client.close()
    await eventually(lambda: stored(pool, device_id), lambda v: len(v) >= 4)
    await asyncio.sleep(1)
    assert await stored(pool, device_id) == [0.3, 4.0, 1e16, 1e16]


async def test_a_device_is_confined_to_its_own_topics(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    device_id, token = await active_device(api)
    other_id, _ = await active_device(api)
    client = Device(gateway.port, device_id, token)
    old = Device(gateway.port, device_id, token, v5=False)
    try:
        assert await client.connect() == 0
        reading = json.dumps({"metric": "t", "value": 9})
        for topic in (
            telemetry(other_id),
            telemetry(device_id, "globex"),
            f"tenants/acme/devices/{device_id}x/telemetry",
        ):
            assert await client.puback(client.publish(topic, reading)) == NOT_AUTHORIZED
        for topic in (
            f"tenants/acme/devices/{other_id}/twin/desired",
            "tenants/acme/devices/+/twin/desired",
            "tenants/acme/#",
            "#",
            f"$share/g/tenants/acme/devices/{device_id}/twin/desired",
        ):
            assert await client.subscribe(topic) == [NOT_AUTHORIZED], topic
        assert await client.subscribe(f"tenants/acme/devices/{device_id}/twin/desired") == [1]
        client.close()
        assert await old.connect() == 0
        assert await old.subscribe(f"tenants/acme/devices/{other_id}/twin/delta") == [0x80]
        await old.puback(old.publish(telemetry(other_id), reading))  # 3.1.1: acknowledged, dropped
        await old.puback(old.publish(telemetry(device_id), json.dumps({"metric": "t", "value": 1})))
    finally:
        client.close()
        old.close()
    await eventually(lambda: stored(pool, device_id), lambda v: len(v) >= 1)
    assert await stored(pool, other_id) == []
    count = await pool.fetchval(
        "SELECT count(*) FROM data.ingest_batches WHERE $1 = ANY(device_ids)", other_id
    )
    assert count == 0


async def test_bad_payloads_are_counted_and_the_connection_stays(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    device_id, token = await active_device(api)
    client = Device(gateway.port, device_id, token)
    try:
        assert await client.connect() == 0
        bad = [
            b"{not json",
            b'{"metric": "t", "value": NaN}',
            b'{"metric": "t", "value": 1e400}',
            b'{"temperature": 21}',
            b'{"metric": "t", "value": 1, "device_id": "someone-else"}',
            b"[]",
            b'{"batch_id": "x", "readings": [{"metric": "t", "value": 1}]}',  # a batch needs ts
        ]
        for payload in bad:
            assert await client.puback(client.publish(telemetry(device_id), payload)) == PAYLOAD_INVALID, (
                payload
            )
        assert await client.puback(client.publish(telemetry(device_id), b'{"metric": "t", "value": 5}')) == 0
    finally:
        client.close()

    async def reasons() -> dict[str, int]:
        rows = (
            await api.get("/v1/telemetry/quarantine", params={"device_id": device_id}, headers=AUTH)
        ).json()
        return {r["reason"]: r["readings"] for r in rows}

    found = await eventually(reasons, lambda r: sum(r.values()) >= len(bad))
    assert "mqtt: invalid JSON" in found
    assert any("not finite" in reason for reason in found)
    await eventually(lambda: stored(pool, device_id), lambda v: v == [5.0])


async def _raw_publish(port: int, device_id: str, token: str, pid: int, payload: bytes, dup: bool) -> bytes:
    """CONNECT (3.1.1, persistent session) and one QoS 1 PUBLISH; returns what came back before
    the socket is dropped (the PUBACK, when it was waited for)."""

    text, packet = codec.text, codec.packet
    connect = text("MQTT") + bytes([4, 0xC0]) + (60).to_bytes(2, "big") + text(device_id) * 2 + text(token)
    publish = text(telemetry(device_id)) + pid.to_bytes(2, "big") + payload
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(packet(0x10, connect))
        assert (await asyncio.wait_for(reader.readexactly(4), 30))[3] == 0
        writer.write(packet(0x32 | (0x08 if dup else 0), publish))
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(4), 30)
    finally:
        writer.close()


async def test_a_redelivered_publish_is_stored_once(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    device_id, token = await active_device(api)
    payload = b'{"metric": "t", "value": 7}'
    # the PUBACK of the first copy is "lost": the device sends it again with DUP on a new connection
    assert await _raw_publish(gateway.port, device_id, token, 7, payload, dup=False) == b"\x40\x02\x00\x07"
    assert await _raw_publish(gateway.port, device_id, token, 7, payload, dup=True) == b"\x40\x02\x00\x07"
    # the packet id used again for a new message (no DUP) is a new reading
    assert await _raw_publish(gateway.port, device_id, token, 7, payload, dup=False) == b"\x40\x02\x00\x07"
    await eventually(lambda: stored(pool, device_id), lambda v: len(v) >= 2)
    await asyncio.sleep(1)
    assert await stored(pool, device_id) == [7.0, 7.0]


async def test_qos1_readings_survive_a_sigkill_of_the_gateway_once_each(
    api: httpx.AsyncClient, settings: Settings, pool: Pool
) -> None:
    gateway = GatewayProcess(settings)
    gateway.start()
    device_id, token = await active_device(api)
    client = Device(gateway.port, device_id, token, v5=False, clean=False)
    count = 400
    try:
        assert await client.connect() == 0
        client.client.reconnect_delay_set(1, 1)
        mids = [
            client.publish(telemetry(device_id), json.dumps({"metric": "t", "value": i}))
            for i in range(count)
        ]
        await client.puback(mids[count // 4])  # some are stored and acknowledged, many in flight
        gateway.kill()
        gateway.start()  # the same port: the client reconnects and redelivers what was not acknowledged
        for mid in mids:
            assert await client.puback(mid, timeout=60) == 0
    finally:
        client.close()
        gateway.stop()
    await eventually(lambda: stored(pool, device_id), lambda v: len(v) >= count, timeout_s=90)
    await asyncio.sleep(1)
    assert await stored(pool, device_id) == [float(i) for i in range(count)]
