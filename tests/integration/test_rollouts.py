"""Firmware rollouts and decommissioning through the API, with simulated devices."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from fleetflow.db import Pool
from tests.integration.flows import AUTH, IMAGE, campaign_body, fleet, upload
from tests.support import eventually


async def devices_work(
    api: httpx.AsyncClient,
    creds: dict[str, str],
    outcome: Callable[[str, str], str | None],
    stop: asyncio.Event,
) -> dict[str, list[str]]:
    """Each device polls for its job, downloads and checks the image, and reports.

    outcome(device_id, kind) says "succeeded", "failed", or None (stay silent).
    """
    seen: dict[str, list[str]] = {}
    while not stop.is_set():
        for device_id, credential in creds.items():
            auth = {"Authorization": f"Bearer {credential}"}
            job = await api.get("/v1/device/jobs", headers=auth)
            if job.status_code != 200:
                continue
            body = job.json()
            result = outcome(device_id, body["kind"])
            if result is None:
                continue
            seen.setdefault(device_id, []).append(body["kind"])
            if body["download_url"]:
                image = await api.get(body["download_url"], headers=auth)
                assert image.status_code == 200 and len(image.content) == body["size"]
            url = f"/v1/device/jobs/{body['campaign_id']}/progress"
            await api.post(url, json={"kind": body["kind"], "state": "downloading"}, headers=auth)
            await api.post(url, json={"kind": body["kind"], "state": result}, headers=auth)
        await asyncio.sleep(0.05)
    return seen


async def progress(api: httpx.AsyncClient, campaign: str) -> dict[str, Any]:
    body: dict[str, Any] = (await api.get(f"/v1/rollouts/{campaign}", headers=AUTH)).json()
    return body


async def test_firmware_upload_download_and_range(api: httpx.AsyncClient) -> None:
    version = f"9.{uuid.uuid4().int % 1000}.0"
    first = await upload(api, version)
    assert first.status_code == 201, first.text
    assert (await upload(api, version)).status_code == 200
    assert (await upload(api, version, IMAGE + b"x")).status_code == 409
    assert (
        await api.post(
            "/v1/firmware", params={"device_type": "toaster", "version": "1"}, content=b"x", headers=AUTH
        )
    ).status_code == 422
    creds = await fleet(api, 1)
    credential = next(iter(creds.values()))
    url = f"/v1/device/firmware/{first.json()['firmware_id']}"
    part = await api.get(url, headers={"Authorization": f"Bearer {credential}", "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == IMAGE[10:20]


async def test_canary_then_waves_in_order_and_the_registry_follows(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    creds = await fleet(api, 12, tags=["lab"])
    version = f"2.{uuid.uuid4().int % 1000}.0"
    await upload(api, version)
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    body = campaign_body(campaign, version, list(creds), canary=2, growth=2)
    started = await api.post("/v1/rollouts", json=body, headers=AUTH)
    assert started.status_code == 202, started.text
    assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 200
    stop = asyncio.Event()
    working = asyncio.create_task(devices_work(api, creds, lambda d, k: "succeeded", stop))
    done = await eventually(lambda: progress(api, campaign), lambda p: p["status"] == "completed", 60)
    stop.set()
    await working
    assert done["waves"] == [2, 4, 6] and done["counts"] == {"succeeded": 12}
    waves = await pool.fetch(
        """SELECT wave, min(offered_at) AS first_offer, max(updated_at) AS last_done
           FROM device.rollout_jobs WHERE campaign_id = $1 GROUP BY wave ORDER BY wave""",
        campaign,
    )
    for earlier, later in itertools.pairwise(waves):
        assert later["first_offer"] >= earlier["last_done"]  # a wave starts once the one before ended
    versions = await pool.fetch(
        "SELECT DISTINCT firmware_version FROM device.devices WHERE device_id = ANY($1)", list(creds)
    )
    assert [v["firmware_version"] for v in versions] == [version]

    async def updated() -> int:
        return int(
            await pool.fetchval(
                "SELECT count(*) FROM notification.events"
                " WHERE type = 'FirmwareUpdated' AND device_id = ANY($1)",
                list(creds),
            )
        )

    await eventually(updated, lambda n: n == 12)
    some = sorted(creds)[0]
    twin = (await api.get(f"/v1/devices/{some}/twin", headers=AUTH)).json()
    assert twin["reported"]["firmware_version"] == version
    history = (await api.get(f"/v1/devices/{some}/history", headers=AUTH)).json()
    assert [e["type"] for e in history if e["type"].startswith("Firmware")] == ["FirmwareUpdated"]


async def test_abort_rolls_back_exactly_the_devices_that_updated(api: httpx.AsyncClient, pool: Pool) -> None:
    creds = await fleet(api, 20)
    ids = sorted(creds)
    failing = set(ids[:3])  # 3 of the 10-device canary fail: 30% > 20%
    version = f"3.{uuid.uuid4().int % 1000}.0"
    await upload(api, version)
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    body = campaign_body(
        campaign, version, ids, canary=10, growth=2, abort_failure_percent=20, abort_min_finished=10
    )
    await api.post("/v1/rollouts", json=body, headers=AUTH)

    def outcome(device_id: str, kind: str) -> str:
        return "failed" if kind == "update" and device_id in failing else "succeeded"

    stop = asyncio.Event()
    working = asyncio.create_task(devices_work(api, creds, outcome, stop))
    done = await eventually(lambda: progress(api, campaign), lambda p: p["status"] == "aborted", 60)
    stop.set()
    seen = await working
    updated = {d for d, kinds in seen.items() if "update" in kinds and d not in failing}
    rolled_back = {d for d, kinds in seen.items() if "rollback" in kinds}
    assert updated and rolled_back == updated
    assert done["rollback_counts"] == {"succeeded": len(updated)}
    assert done["counts"].get("cancelled", 0) == 10  # the second wave was never offered
    versions = await pool.fetch(
        "SELECT device_id, firmware_version FROM device.devices WHERE device_id = ANY($1)", ids
    )
    assert {v["firmware_version"] for v in versions} == {"1.0.0"}


async def test_pause_holds_resume_continues_cancel_compensates(api: httpx.AsyncClient, pool: Pool) -> None:
    creds = await fleet(api, 6)
    version = f"4.{uuid.uuid4().int % 1000}.0"
    await upload(api, version)
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    body = campaign_body(campaign, version, list(creds), canary=2, growth=2)
    await api.post("/v1/rollouts", json=body, headers=AUTH)
    await eventually(lambda: progress(api, campaign), lambda p: p["counts"].get("offered", 0) == 2)
    paused = await api.post(f"/v1/rollouts/{campaign}/pause", headers=AUTH)
    assert paused.status_code == 200, paused.text
    stop = asyncio.Event()
    answering = set(sorted(creds)[:4])  # the others stay silent, so the campaign cannot finish

    def outcome(device_id: str, kind: str) -> str | None:
        return "succeeded" if device_id in answering or kind == "rollback" else None

    working = asyncio.create_task(devices_work(api, creds, outcome, stop))
    held = await eventually(lambda: progress(api, campaign), lambda p: p["counts"].get("succeeded", 0) == 2)
    await asyncio.sleep(1.0)
    still = await progress(api, campaign)
    assert still["status"] == "paused" and still["counts"].get("queued") == 4 == held["counts"].get("queued")
    assert (await api.post(f"/v1/rollouts/{campaign}/resume", headers=AUTH)).status_code == 200
    await eventually(lambda: progress(api, campaign), lambda p: p["counts"].get("succeeded", 0) == 4)
    cancelled = await api.post(f"/v1/rollouts/{campaign}/cancel", json={"reason": "test"}, headers=AUTH)
    assert cancelled.status_code == 200, cancelled.text
    done = await eventually(lambda: progress(api, campaign), lambda p: p["status"] == "cancelled", 60)
    stop.set()
    await working
    assert done["rollback_counts"] == {"succeeded": done["counts"]["succeeded"]}
    versions = await pool.fetch(
        "SELECT firmware_version FROM device.devices WHERE device_id = ANY($1)", list(creds)
    )
    assert {v["firmware_version"] for v in versions} == {"1.0.0"}
    late = await api.post(f"/v1/rollouts/{campaign}/pause", headers=AUTH)
    assert late.status_code in (404, 409)


async def test_a_silent_device_is_offered_again_then_times_out(api: httpx.AsyncClient, pool: Pool) -> None:
    creds = await fleet(api, 1)
    version = f"5.{uuid.uuid4().int % 1000}.0"
    await upload(api, version)
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    body = campaign_body(
        campaign, version, list(creds), canary=1, device_timeout_s=1, retry_limit=1, wave_success_percent=0
    )
    await api.post("/v1/rollouts", json=body, headers=AUTH)
    done = await eventually(lambda: progress(api, campaign), lambda p: p["status"] == "completed", 60)
    assert done["counts"] == {"timed_out": 1}
    attempts = await pool.fetchval(
        "SELECT attempts FROM device.rollout_jobs WHERE campaign_id = $1", campaign
    )
    assert attempts == 2


async def test_decommission_revokes_access_at_once_and_archives(api: httpx.AsyncClient, pool: Pool) -> None:
    creds = await fleet(api, 1)
    device_id, credential = next(iter(creds.items()))
    auth = {"Authorization": f"Bearer {credential}"}
    reading = {
        "batch_id": uuid.uuid4().hex,
        "readings": [{"device_id": device_id, "ts": "2026-01-01T00:00:00Z", "metric": "t", "value": 1.0}],
    }
    assert (await api.post("/v1/telemetry", json=reading, headers=auth)).status_code == 202

    async def stored() -> int:
        return int(await pool.fetchval("SELECT count(*) FROM data.readings WHERE device_id = $1", device_id))

    await eventually(stored, lambda n: n == 1)
    started = await api.post(f"/v1/devices/{device_id}:decommission", json={}, headers=AUTH)
    assert started.status_code == 202, started.text
    done = await eventually(
        lambda: api.get(f"/v1/decommissions/{device_id}", headers=AUTH),
        lambda r: r.status_code == 200 and r.json()["status"] == "completed",
    )
    assert done.json()["done"][0] == "revoke_credentials"
    reading["batch_id"] = uuid.uuid4().hex
    assert (await api.post("/v1/telemetry", json=reading, headers=auth)).status_code == 401
    assert (await api.get("/v1/device/jobs", headers=auth)).status_code == 401
    device = (await api.get(f"/v1/devices/{device_id}", headers=AUTH)).json()
    assert device["status"] == "decommissioned"
    assert await stored() == 0
    assert (
        await pool.fetchval("SELECT count(*) FROM data.archived_readings WHERE device_id = $1", device_id)
        == 1
    )
    twin = await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH)
    assert twin.status_code == 409 or twin.json()["ended"] is True


async def test_bulk_decommission_with_an_unknown_id_starts_nothing(api: httpx.AsyncClient) -> None:
    creds = await fleet(api, 1)
    known = next(iter(creds))
    body = {"device_ids": [known, "no-such-device"]}
    refused = await api.post("/v1/devices:decommission", json=body, headers=AUTH)
    assert refused.status_code == 404 and "no-such-device" in refused.text
    assert (await api.get(f"/v1/decommissions/{known}", headers=AUTH)).status_code == 404
    assert (await api.get(f"/v1/devices/{known}", headers=AUTH)).json()["status"] == "active"
