"""`fleetflow simulate --transport mqtt`: the simulated devices publish over MQTT, every
acknowledged reading is stored."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Iterator

import httpx
import pytest

from cli.simulate import Options, simulate
from cli.simulate_jobs import JobStats
from cli.simulate_mqtt import connect_all, work_jobs_mqtt
from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.flows import campaign_body, fleet, upload
from tests.integration.mqtt_support import GatewayProcess, gateway_process
from tests.integration.test_rollouts import progress
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


async def test_simulated_devices_take_part_in_a_rollout_over_mqtt(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    """Jobs pushed on jobs/notify, progress published: the campaign counts the simulator's outcomes."""
    creds = await fleet(api, 4)
    version = f"7.{random.randrange(10_000)}.0"
    await upload(api, version)
    devices = await connect_all(creds, "acme", "127.0.0.1", gateway.port)
    stats, stop = JobStats(), asyncio.Event()
    working = asyncio.create_task(work_jobs_mqtt(api, devices, (0.5, 0.0), random.Random(5), stats, stop))
    try:
        campaign = f"simq-{random.randrange(10**6)}"
        body = campaign_body(campaign, version, sorted(creds), canary=4)
        assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 202
        done = await eventually(
            lambda: progress(api, campaign), lambda p: p["status"] in ("completed", "aborted"), 60
        )
    finally:
        stop.set()
        await working
        for device in devices.values():
            await device.close()
    assert stats.offered >= 4 and stats.bad_images == 0
    assert stats.succeeded + stats.failed == stats.offered
    counts = done["counts"]
    assert counts.get("succeeded", 0) + counts.get("failed", 0) >= 4, counts
    assert counts.get("failed", 0) <= stats.failed
