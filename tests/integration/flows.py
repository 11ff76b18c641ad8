"""API flows the integration tests share: onboarding a device step by step."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.support import bearer, eventually

AUTH = bearer("acme")


def new_id(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def onboard(api: httpx.AsyncClient, device_id: str, **extra: Any) -> httpx.Response:
    body = {"device_id": device_id, "device_type": "thermostat", **extra}
    return await api.post("/v1/devices", json=body, headers=AUTH)


async def progress_until(api: httpx.AsyncClient, device_id: str, *statuses: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any]:
        response = await api.get(f"/v1/onboardings/{device_id}", headers=AUTH)
        body: dict[str, Any] = response.json()
        return body

    return await eventually(probe, lambda p: p.get("status") in statuses)


async def contact(api: httpx.AsyncClient, credential: str, **body: Any) -> httpx.Response:
    return await api.post("/v1/device-contact", json=body, headers={"Authorization": f"Bearer {credential}"})


async def active_device(
    api: httpx.AsyncClient, device_type: str = "thermostat", **extra: Any
) -> tuple[str, str]:
    """Onboard a device to `active`; returns its id and credential."""
    device_id = new_id()
    accepted = await onboard(api, device_id, device_type=device_type, **extra)
    assert accepted.status_code == 202, accepted.text
    waiting = await progress_until(api, device_id, "awaiting_first_contact")
    assert (await contact(api, waiting["credential"])).status_code == 202
    await progress_until(api, device_id, "completed")
    return device_id, waiting["credential"]
