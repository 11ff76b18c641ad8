"""API flows the integration tests share: onboarding a device step by step, a bulk-onboarded
fleet with its credentials, firmware images and campaigns."""

from __future__ import annotations

import csv
import io
import uuid
from typing import Any

import httpx

from tests.support import bearer, eventually

AUTH = bearer("acme")
IMAGE = b"\x7fFW" + bytes(range(256)) * 40


def new_id(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def onboard(
    api: httpx.AsyncClient, device_id: str, *, auth: dict[str, str] = AUTH, **extra: Any
) -> httpx.Response:
    body = {"device_id": device_id, "device_type": "thermostat", **extra}
    return await api.post("/v1/devices", json=body, headers=auth)


async def progress_until(
    api: httpx.AsyncClient, device_id: str, *statuses: str, auth: dict[str, str] = AUTH
) -> dict[str, Any]:
    async def probe() -> dict[str, Any]:
        response = await api.get(f"/v1/onboardings/{device_id}", headers=auth)
        body: dict[str, Any] = response.json()
        return body

    return await eventually(probe, lambda p: p.get("status") in statuses)


async def contact(api: httpx.AsyncClient, credential: str, **body: Any) -> httpx.Response:
    return await api.post("/v1/device-contact", json=body, headers={"Authorization": f"Bearer {credential}"})


async def active_device(
    api: httpx.AsyncClient,
    device_type: str = "thermostat",
    *,
    auth: dict[str, str] = AUTH,
    device_id: str | None = None,
    **extra: Any,
) -> tuple[str, str]:
    """Onboard a device (of auth's tenant) to `active`; returns its id and credential."""
    device_id = device_id or new_id()
    accepted = await onboard(api, device_id, auth=auth, device_type=device_type, **extra)
    assert accepted.status_code == 202, accepted.text
    waiting = await progress_until(api, device_id, "awaiting_first_contact", auth=auth)
    assert (await contact(api, waiting["credential"])).status_code == 202
    await progress_until(api, device_id, "completed", auth=auth)
    return device_id, waiting["credential"]


async def fleet(
    api: httpx.AsyncClient, count: int, tags: list[str] | None = None, *, auth: dict[str, str] = AUTH
) -> dict[str, str]:
    """Bulk-onboard `count` sensors (of auth's tenant); their credentials by device id."""
    prefix = f"fw-{uuid.uuid4().hex[:6]}"
    devices = [
        {
            "device_id": f"{prefix}-{i:03d}",
            "device_type": "sensor",
            "firmware_version": "1.0.0",
            "tags": tags or [],
        }
        for i in range(count)
    ]
    bulk = (await api.post("/v1/devices:bulk", json={"devices": devices}, headers=auth)).json()

    async def done() -> str:
        return str((await api.get(bulk["status_url"], headers=auth)).json()["status"])

    await eventually(done, lambda s: s == "completed")
    text = (await api.get(f"/v1/bulk-onboardings/{bulk['bulk_id']}/credentials", headers=auth)).text
    return {r["device_id"]: r["credential"] for r in csv.DictReader(io.StringIO(text))}


async def upload(
    api: httpx.AsyncClient, version: str, image: bytes = IMAGE, *, auth: dict[str, str] = AUTH
) -> httpx.Response:
    """Upload a sensor firmware image."""
    return await api.post(
        "/v1/firmware",
        params={"device_type": "sensor", "version": version},
        content=image,
        headers={**auth, "Content-Type": "application/octet-stream"},
    )


def campaign_body(campaign: str, version: str, ids: list[str], **policy: Any) -> dict[str, Any]:
    """A rollout request of the sensor firmware `version` to the devices `ids`."""
    policy.setdefault("rate_per_minute", 60000)
    policy.setdefault("abort_min_finished", 100)
    return {
        "campaign_id": campaign,
        "firmware_id": f"sensor-{version}",
        "target": {"device_ids": ids},
        "policy": policy,
    }
