"""`fleetflow simulate --transport mqtt`: the simulated devices publish over MQTT, every
acknowledged reading is stored."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest

from cli.simulate import Options, simulate
from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.mqtt_support import GatewayProcess, gateway_process
from tests.support import bearer, eventually

AUTH = bearer("acme")


@pytest.fixture(scope="module")
def gateway(settings: Settings, pool: Pool) -> Iterator[GatewayProcess]:
    yield from gateway_process(settings)


async def test_simulated_devices_publish_over_mqtt(
    api: httpx.AsyncClient, gateway: GatewayProcess, pool: Pool
) -> None:
    options = Options(
        devices=3, rate=30, duration_s=2, settle_s=10, seed=3, transport="mqtt", mqtt_port=gateway.port
    )
    summary = await simulate(api, AUTH, options, io.StringIO())
    assert (summary.rejected, dict(summary.reasons)) == (0, {}), summary.render()
    assert summary.sent > 0 and summary.acknowledged == summary.sent

    async def stored() -> int:
        query = "SELECT count(*) FROM data.readings WHERE device_id = ANY($1)"
        return int(await pool.fetchval(query, summary.devices))

    await eventually(stored, lambda n: n == summary.acknowledged)
    published = await pool.fetchval(
        "SELECT count(*) FROM data.ingest_batches WHERE device_ids && $1::text[]", summary.devices
    )
    assert published == summary.acknowledged_batches
    # they came over MQTT: each device held a connection
    connected = await pool.fetchval(
        "SELECT count(*) FROM device.mqtt_presence WHERE device_id = ANY($1)", summary.devices
    )
    assert connected == len(summary.devices)
