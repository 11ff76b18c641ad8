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
import pytest
from temporalio.client import Client

from api.limits import BULK_MAX_BODY_BYTES as MAX_BULK_BYTES
from fleetflow.contracts.limits import MAX_BULK_DEVICES
from fleetflow.db import Pool
from tests.integration.conftest import FAULTS
from tests.integration.flows import AUTH
from tests.support import eventually

EVENT_LIMIT = 256 * 1024


def largest_body(prefix: str, firmware: str) -> bytes:
    """MAX_BULK_DEVICES devices, 128-character ids, metadata filling the body to its limit."""

    def device(i: int, note: str) -> dict[str, Any]:
        device_id = f"{prefix}-{i:05d}-".ljust(128, "x")
        return {
            "device_id": device_id,
            "device_type": "sensor",
            "firmware_version": firmware,
            "tags": ["t" * 64],
            "metadata": {"note": note},
        }

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


@pytest.mark.timeout(900)  # 10,000 devices, 60 undone slices of events, on a shared machine
async def test_the_progress_of_10000_failures_is_answered_page_by_page(api: httpx.AsyncClient) -> None:
    # every device fails with a reason of ~50 characters: all 10,000 failures in one query answer
    # were ~2.2 MB, past the server's 2 MiB payload limit (the route answered 500 for good)
    prefix = f"pg-{uuid.uuid4().hex[:8]}"
    ids = [f"{prefix}-{i:05d}-".ljust(128, "x") for i in range(MAX_BULK_DEVICES)]
    for offset in range(0, MAX_BULK_DEVICES, 500):  # one failing device in each batch of events
        for first in (0, 200, 400):
            FAULTS[ids[offset + first]] = "record_event"
    try:
        body = {"devices": [{"device_id": d, "device_type": "sensor"} for d in ids]}
        accepted = await api.post("/v1/devices:bulk", json=body, headers=AUTH, timeout=300)
        assert accepted.status_code == 202, accepted.text
        url = accepted.json()["status_url"]

        async def progress() -> httpx.Response:
            return await api.get(url, headers=AUTH, timeout=60)

        done = await eventually(
            progress, lambda r: r.status_code != 200 or r.json()["status"] == "completed", 1200
        )
    finally:
        for device_id in ids:
            FAULTS.pop(device_id, None)
    assert done.status_code == 200, done.text
    first = done.json()
    assert (first["onboarded"], first["failed"], len(first["failures"])) == (0, 10_000, 1000)
    assert all(f["reason"].startswith("event not recorded") for f in first["failures"])
    seen = [f["device_id"] for f in first["failures"]]
    for start in range(1000, MAX_BULK_DEVICES, 1000):
        page = await api.get(url, params={"failures_from": start}, headers=AUTH, timeout=60)
        assert page.status_code == 200 and page.json()["failed"] == 10_000
        seen += [f["device_id"] for f in page.json()["failures"]]
    assert sorted(seen) == ids
    past = await api.get(url, params={"failures_from": MAX_BULK_DEVICES}, headers=AUTH)
    assert past.status_code == 200 and past.json()["failures"] == []
