"""The largest bulk import the API accepts keeps every event of its history small.

10,000 devices with 128-character ids in a body just under the 8 MiB limit, onboarded once
(every device succeeds) and then again with another body (every device fails): the device
ids, the failures and the events travel through the workflow's history in slices, and no
single history event may carry more than 256 KiB.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from temporalio.client import Client

from api.routers.devices import MAX_BULK_BYTES
from fleetflow.contracts.devices import MAX_BULK_DEVICES
from fleetflow.db import Pool
from tests.integration.flows import AUTH
from tests.support import eventually

EVENT_LIMIT = 256 * 1024


def largest_body(prefix: str, firmware: str) -> bytes:
    """MAX_BULK_DEVICES devices, 128-character ids, metadata filling the body to its limit."""

    def device(i: int, note: str) -> dict[str, Any]:
        device_id = f"{prefix}-{i:05d}-".ljust(128, "x")
        return {"device_id": device_id, "device_type": "sensor", "firmware_version": firmware,
                "tags": ["t" * 64], "metadata": {"note": note}}  # fmt: skip

    bare = len(json.dumps({"devices": [device(i, "") for i in range(MAX_BULK_DEVICES)]}).encode())
    room = (MAX_BULK_BYTES - bare) // MAX_BULK_DEVICES
    body = json.dumps({"devices": [device(i, "n" * room) for i in range(MAX_BULK_DEVICES)]}).encode()
    assert MAX_BULK_BYTES - MAX_BULK_DEVICES < len(body) <= MAX_BULK_BYTES
    return body


async def import_and_measure(
    api: httpx.AsyncClient, client: Client, body: bytes
) -> tuple[dict[str, Any], int]:
    """Run the import to its end; its progress and the largest event of its history in bytes."""
    headers = {**AUTH, "Content-Type": "application/json"}
    accepted = await api.post("/v1/devices:bulk", content=body, headers=headers, timeout=300)
    assert accepted.status_code == 202, accepted.text
    url = accepted.json()["status_url"]

    async def progress() -> dict[str, Any]:
        answer: dict[str, Any] = (await api.get(url, headers=AUTH, timeout=60)).json()
        return answer

    done = await eventually(progress, lambda p: p.get("status") in ("completed", "failed"), 1200)
    history = await client.get_workflow_handle(accepted.json()["workflow_id"]).fetch_history()
    largest = max(len(event.SerializeToString()) for event in history.events)
    print(f"{len(history.events)} events, the largest {largest} bytes")  # shown with -s
    return done, largest


async def test_the_largest_bulk_import_keeps_every_history_event_under_256_kib(
    api: httpx.AsyncClient, client: Client
) -> None:
    prefix = f"big-{uuid.uuid4().hex[:8]}"
    onboarded, largest = await import_and_measure(api, client, largest_body(prefix, "1." + "0" * 62))
    assert (onboarded["status"], onboarded["onboarded"], onboarded["failed"]) == ("completed", 10_000, 0)
    assert largest <= EVENT_LIMIT, f"an event of {largest} bytes"

    # the same devices again (another body, another import): every one fails, with its reason
    refused, largest = await import_and_measure(api, client, largest_body(prefix, "2." + "0" * 62))
    assert (refused["status"], refused["onboarded"], refused["failed"]) == ("completed", 0, 10_000)
    assert all("already registered (active)" in f["reason"] for f in refused["failures"])
    assert largest <= EVENT_LIMIT, f"an event of {largest} bytes"


async def test_cancelling_the_largest_import_undoes_every_device_it_onboarded(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    prefix = f"big-{uuid.uuid4().hex[:8]}"
    headers = {**AUTH, "Content-Type": "application/json"}
    body = largest_body(prefix, "3." + "0" * 62)
    accepted = await api.post("/v1/devices:bulk", content=body, headers=headers, timeout=300)
    assert accepted.status_code == 202, accepted.text
    url = accepted.json()["status_url"]

    async def progress() -> dict[str, Any]:
        answer: dict[str, Any] = (await api.get(url, headers=AUTH, timeout=60)).json()
        return answer

    await eventually(progress, lambda p: p["onboarded"] >= 2000, 600)  # some slices done, others running
    handle = client.get_workflow_handle(accepted.json()["workflow_id"])
    await handle.cancel()
    cancelled = await eventually(progress, lambda p: p["status"] in ("cancelled", "failed"), 600)
    assert (cancelled["status"], cancelled["onboarded"]) == ("cancelled", 0)
    undone = await pool.fetchval(
        """SELECT count(*) FROM device.devices
           WHERE tenant = 'acme' AND device_id LIKE $1 AND status = 'failed'""",
        f"{prefix}-%",
    )
    live = await pool.fetchval(
        """SELECT count(*) FROM device.devices d LEFT JOIN device.credentials c USING (tenant, device_id)
           WHERE d.tenant = 'acme' AND d.device_id LIKE $1
             AND (d.status <> 'failed' OR c.revoked_at IS NULL)""",
        f"{prefix}-%",
    )
    assert undone >= 2000 and live == 0
    history = await handle.fetch_history()
    assert max(len(event.SerializeToString()) for event in history.events) <= EVENT_LIMIT
