"""The README's session with Mosquitto's own command-line clients (skipped without them)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator

import httpx
import pytest

from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.flows import AUTH, active_device
from tests.integration.mqtt_support import GatewayProcess, gateway_process
from tests.support import eventually

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed"
)


@pytest.fixture(scope="module")
def gateway(settings: Settings, pool: Pool) -> Iterator[GatewayProcess]:
    yield from gateway_process(settings)


async def _run(*argv: str) -> int:
    proc = await asyncio.create_subprocess_exec(*argv)
    return await asyncio.wait_for(proc.wait(), 60)


async def test_mosquitto_clients_publish_and_receive(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    device_id, cred = await active_device(api)
    base = f"tenants/acme/devices/{device_id}"
    login = ["-h", "127.0.0.1", "-p", str(gateway.port), "-i", device_id, "-u", device_id, "-P", cred]
    reading = json.dumps({"metric": "temperature", "value": 21.4})
    assert await _run("mosquitto_pub", *login, "-q", "1", "-t", f"{base}/telemetry", "-m", reading) == 0
    wrong = [*login[:-1], "not-the-credential"]
    assert await _run("mosquitto_pub", *wrong, "-q", "1", "-t", f"{base}/telemetry", "-m", reading) != 0
    assert (
        await _run(
            "mosquitto_pub", *login, "-q", "1", "-t", f"{base}/twin/reported", "-m", '{"target_c": 22}'
        )
        == 0
    )
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        *login,
        "-q",
        "1",
        "-v",
        "-C",
        "2",
        "-W",
        "60",
        "-t",
        f"{base}/twin/desired",
        "-t",
        f"{base}/twin/delta",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(sub.communicate(), 90)
    lines = out.decode().splitlines()
    assert any(line.startswith(f"{base}/twin/desired {{") for line in lines), lines

    async def values() -> list[float]:
        rows = await pool.fetch("SELECT value FROM data.readings WHERE device_id = $1", device_id)
        return [r["value"] for r in rows]

    assert await eventually(values, bool) == [21.4]
    twin = (await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH)).json()
    assert twin["reported"]["target_c"] == 22

    async def connection() -> str:
        return str((await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH)).json()["connection"])

    # the clients' connections lasted milliseconds: each one's offline is still written after its online
    await eventually(connection, lambda c: c == "offline")

    async def kinds() -> list[str]:
        rows = await pool.fetch(
            "SELECT type FROM notification.events WHERE device_id = $1 AND type LIKE 'Device%nected'",
            device_id,
        )
        return [r["type"] for r in rows]

    # every connection's end is recorded, also one whose offline a later connection's online
    # overtook (its write raced the next mosquitto_pub's CONNECT)
    await eventually(kinds, lambda k: k.count("DeviceConnected") == k.count("DeviceDisconnected") == 3)
