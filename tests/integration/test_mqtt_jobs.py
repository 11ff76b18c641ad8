"""Rollout jobs over MQTT: the offered job pushed on jobs/notify, progress published on
jobs/{campaign}/progress, the campaign counting it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.flows import AUTH, campaign_body, fleet, upload
from tests.integration.mqtt_support import Device, GatewayProcess, gateway_process
from tests.support import eventually


@pytest.fixture(scope="module")
def gateway(settings: Settings, pool: Pool) -> Iterator[GatewayProcess]:
    yield from gateway_process(settings)


async def test_job_offered_is_pushed_and_progress_counts(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    creds = await fleet(api, 1)
    device_id, credential = next(iter(creds.items()))
    version = f"5.{uuid.uuid4().int % 1000}.0"
    assert (await upload(api, version)).status_code in (200, 201)
    base = f"tenants/acme/devices/{device_id}/jobs"
    device = Device(gateway.port, device_id, credential)
    try:
        assert await device.connect() == 0
        assert await device.subscribe(f"{base}/notify") == [1]
        campaign = f"c-{uuid.uuid4().hex[:6]}"
        started = await api.post(
            "/v1/rollouts", json=campaign_body(campaign, version, [device_id]), headers=AUTH
        )
        assert started.status_code == 202, started.text
        message = await asyncio.to_thread(device.messages.get, True, 60)
        assert message.topic == f"{base}/notify"
        job: dict[str, Any] = json.loads(message.payload)
        assert job["campaign_id"] == campaign and job["version"] == version
        for state in ("downloading", "installing", "succeeded"):
            mid = device.publish(
                f"{base}/{campaign}/progress", json.dumps({"kind": job["kind"], "state": state})
            )
            assert await device.puback(mid) == 0
        unknown = device.publish(f"{base}/no-such-campaign/progress", json.dumps({"state": "downloading"}))
        assert await device.puback(unknown) != 0
    finally:
        device.close()

    async def counts() -> dict[str, Any]:
        body: dict[str, Any] = (await api.get(f"/v1/rollouts/{campaign}", headers=AUTH)).json()
        return body

    done = await eventually(counts, lambda p: p["status"] == "completed", 60)
    assert done["counts"] == {"succeeded": 1}
