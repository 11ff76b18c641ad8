"""Firmware rollouts at the edges: a device that finishes installing after the campaign
stopped, a tick retried after its offer committed, a thousand jobs cancelled by
decommissioning, and the largest explicit target list the API accepts."""

from __future__ import annotations

import asyncio
import uuid
from functools import partial

import httpx
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.devices import DeviceService
from fleetflow.contracts.rollouts import DeviceStep, RolloutTick, TickResult
from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.conftest import TICK_FAULTS
from tests.integration.flows import AUTH, campaign_body, fleet, upload
from tests.integration.test_rollouts import progress
from tests.support import bearer, eventually
from workflows.firmware_rollout import rollout_id

MAX_EVENT_BYTES = 256 * 1024


async def report(api: httpx.AsyncClient, credential: str, campaign: str, kind: str, *states: str) -> None:
    auth = {"Authorization": f"Bearer {credential}"}
    for state in states:
        answer = await api.post(
            f"/v1/device/jobs/{campaign}/progress", json={"kind": kind, "state": state}, headers=auth
        )
        assert answer.status_code == 202, answer.text


async def job_kind(api: httpx.AsyncClient, credential: str) -> str | None:
    job = await api.get("/v1/device/jobs", headers={"Authorization": f"Bearer {credential}"})
    return str(job.json()["kind"]) if job.status_code == 200 else None


async def event_types(pool: Pool, device_id: str) -> list[str]:
    rows = await pool.fetch(
        """SELECT type FROM notification.events WHERE tenant = 'acme' AND device_id = $1
             AND type LIKE 'Firmware%' ORDER BY occurred_at, type""",
        device_id,
    )
    return [r["type"] for r in rows]


async def test_a_device_that_succeeds_after_the_cancel_is_rolled_back(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    creds = await fleet(api, 3)
    late, *silent = sorted(creds)
    version = f"6.{uuid.uuid4().int % 1000}.0"
    await upload(api, version)
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    await api.post("/v1/rollouts", json=campaign_body(campaign, version, list(creds), canary=3), headers=AUTH)
    await eventually(lambda: job_kind(api, creds[late]), lambda k: k == "update")
    await report(api, creds[late], campaign, "update", "downloading", "installing")
    cancelled = await api.post(f"/v1/rollouts/{campaign}/cancel", json={"reason": "test"}, headers=AUTH)
    assert cancelled.status_code == 200, cancelled.text
    # the silent devices' offers are cancelled; the one installing is followed, not forgotten
    following = await eventually(
        lambda: progress(api, campaign), lambda p: p["counts"].get("cancelled") == len(silent)
    )
    assert following["status"] == "rolling_back" and following["counts"].get("installing") == 1

    await report(api, creds[late], campaign, "update", "succeeded")  # the install ends after the stop
    await eventually(lambda: job_kind(api, creds[late]), lambda k: k == "rollback")
    await report(api, creds[late], campaign, "rollback", "downloading", "succeeded")
    done = await eventually(lambda: progress(api, campaign), lambda p: p["status"] == "cancelled")
    assert done["counts"] == {"succeeded": 1, "cancelled": 2} and done["rollback_counts"] == {"succeeded": 1}
    device = (await api.get(f"/v1/devices/{late}", headers=AUTH)).json()
    assert device["firmware_version"] == "1.0.0"
    assert await eventually(lambda: event_types(pool, late), lambda t: len(t) == 2) == [
        "FirmwareUpdated",
        "FirmwareRolledBack",
    ]


async def test_a_tick_retried_after_its_offer_committed_offers_nothing_more(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    creds = await fleet(api, 5)
    version = f"7.{uuid.uuid4().int % 1000}.0"
    await upload(api, version)
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    # one device now, the next one in 100 minutes: any second offer is the retry's
    body = campaign_body(campaign, version, list(creds), canary=5, rate_per_minute=0.01)
    TICK_FAULTS.add(campaign)
    await api.post("/v1/rollouts", json=body, headers=AUTH)
    counted = await eventually(lambda: progress(api, campaign), lambda p: "offered" in p["counts"])
    assert campaign not in TICK_FAULTS  # the first offering tick failed after committing
    assert counted["counts"] == {"offered": 1, "queued": 4}
    offered = await pool.fetchval(
        """SELECT count(*) FROM device.rollout_jobs
           WHERE tenant = 'acme' AND campaign_id = $1 AND state = 'offered'""",
        campaign,
    )
    assert offered == 1
    await api.post(f"/v1/rollouts/{campaign}/cancel", headers=AUTH)


async def test_a_campaign_offers_no_faster_than_its_pace(api: httpx.AsyncClient, pool: Pool) -> None:
    creds = await fleet(api, 5)
    version = f"7.{uuid.uuid4().int % 1000}.1"
    await upload(api, version)
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    body = campaign_body(campaign, version, list(creds), canary=5, rate_per_minute=0.01)
    await api.post("/v1/rollouts", json=body, headers=AUTH)
    counted = await eventually(lambda: progress(api, campaign), lambda p: "offered" in p["counts"])
    assert counted["counts"] == {"offered": 1, "queued": 4}  # one device now, the next in 100 minutes
    await api.post(f"/v1/rollouts/{campaign}/cancel", headers=AUTH)


async def test_a_thousand_cancelled_jobs_do_not_hold_back_the_events(
    api: httpx.AsyncClient, pool: Pool, settings: Settings
) -> None:
    creds = await fleet(api, 1002)
    canary, retired = sorted(creds)[:2], sorted(creds)[2:]
    version = f"8.{uuid.uuid4().int % 1000}.0"
    await upload(api, version)
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    body = campaign_body(campaign, version, sorted(creds), canary=2, growth=100, wave_success_percent=0)
    await api.post("/v1/rollouts", json=body, headers=AUTH)
    await eventually(lambda: progress(api, campaign), lambda p: p["counts"].get("offered") == 2)
    devices = DeviceService(pool, settings)
    for device_id in retired:  # what decommissioning does to each device's jobs
        await devices.cancel_jobs(DeviceStep(tenant="acme", device_id=device_id, actor="test"))
    for device_id in canary:
        await report(api, creds[device_id], campaign, "update", "downloading", "succeeded")
    done = await eventually(lambda: progress(api, campaign), lambda p: p["status"] == "completed", 60)
    assert done["counts"] == {"succeeded": 2, "cancelled": 1000}
    for device_id in canary:
        assert await eventually(partial(event_types, pool, device_id), bool) == ["FirmwareUpdated"]


async def test_the_largest_target_list_stays_out_of_history(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    creds = await fleet(api, 2)
    version = f"9.{uuid.uuid4().int % 1000}.0"
    await upload(api, version)
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    # 100,000 ids of the longest length a device id may have, two of them real devices
    filler = [f"{uuid.uuid4().hex}-{i:06d}".ljust(128, "x") for i in range(100_000 - len(creds))]
    ids = sorted(creds) + filler
    assert max(map(len, ids[2:])) == 128
    started = await api.post(
        "/v1/rollouts", json=campaign_body(campaign, version, ids, canary=2), headers=AUTH
    )
    assert started.status_code == 202, started.text
    for credential in creds.values():
        await eventually(partial(job_kind, api, credential), lambda k: k == "update")
        await report(api, credential, campaign, "update", "downloading", "succeeded")
    done = await eventually(lambda: progress(api, campaign), lambda p: p["status"] == "completed", 60)
    assert done["total"] == 2 and done["counts"] == {"succeeded": 2}
    wid = rollout_id("acme", campaign)
    largest = 0
    async for run in client.list_workflows(f"WorkflowId = '{wid}'"):
        history = await client.get_workflow_handle(wid, run_id=run.run_id).fetch_history()
        largest = max(largest, *(event.ByteSize() for event in history.events))
    assert 0 < largest <= MAX_EVENT_BYTES
    again = await api.post("/v1/rollouts", json=campaign_body(campaign, version, ids, canary=2), headers=AUTH)
    assert again.status_code == 200  # the same request is the same campaign


async def test_two_tenants_with_the_same_campaign_and_ids_each_update_their_own(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    ids = [f"twin-id-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    version = f"10.{uuid.uuid4().int % 1000}.0"
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    tenants = {f"ro-{uuid.uuid4().hex[:6]}": None, f"ro-{uuid.uuid4().hex[:6]}-x": None}
    for tenant in tenants:
        auth = bearer(tenant)
        devices = [{"device_id": d, "device_type": "sensor", "firmware_version": "1.0.0"} for d in ids]
        bulk = (await api.post("/v1/devices:bulk", json={"devices": devices}, headers=auth)).json()
        await eventually(
            partial(api.get, bulk["status_url"], headers=auth), lambda r: r.json()["status"] == "completed"
        )
        await upload(api, version, auth=auth)
        # the same campaign id and the very same body in both tenants: the same list digest
        started = await api.post(
            "/v1/rollouts", json=campaign_body(campaign, version, ids, canary=2), headers=auth
        )
        assert started.status_code == 202, started.text
    for tenant in tenants:
        auth = bearer(tenant)
        running = await eventually(
            partial(api.get, f"/v1/rollouts/{campaign}", headers=auth),
            lambda r: r.json()["counts"].get("offered") == 2,
        )
        assert running.json()["total"] == 2
        await api.post(f"/v1/rollouts/{campaign}/cancel", headers=auth)
    claims = await pool.fetch(
        """SELECT claim_id, tenant FROM fleetflow.claim_checks
           WHERE kind = 'rollout-targets' AND tenant = ANY($1)""",
        list(tenants),
    )
    assert sorted(r["tenant"] for r in claims) == sorted(tenants)  # one list each, each its own


async def waiting_on_a_lock(pool: Pool, statement: str) -> bool:
    """Whether a session runs `statement` (a fragment) and waits for a lock."""
    return bool(
        await pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity
               WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'""",
            statement,
        )
    )


async def test_a_report_committing_after_a_later_one_is_not_skipped_by_the_cursor(
    api: httpx.AsyncClient, pool: Pool, settings: Settings
) -> None:
    """Two devices report success at once. The first one's finish number is drawn first but
    its transaction commits last; a tick that read only the second moved the cursor past both,
    and the first device's FirmwareUpdated event was never recorded."""
    creds = await fleet(api, 2)
    first, second = sorted(creds)
    version = f"5.{uuid.uuid4().int % 1000}.0"
    await upload(api, version)
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    await pool.execute(
        """INSERT INTO device.rollouts (tenant, campaign_id, firmware_id, request, waves)
           VALUES ('acme', $1, $2, '{}', '{2}')""",
        campaign,
        f"sensor-{version}",
    )
    await pool.execute(
        """INSERT INTO device.rollout_jobs (tenant, campaign_id, device_id, kind, wave, state, attempts,
               target_version, previous_version, offered_at)
           SELECT 'acme', $1, d, 'update', 0, 'installing', 1, $2, '1.0.0', now()
           FROM unnest($3::text[]) d""",
        campaign,
        version,
        [first, second],
    )
    devices = DeviceService(pool, settings)
    env = ActivityEnvironment()

    def tick(after: int) -> RolloutTick:
        return RolloutTick(
            tenant="acme",
            campaign_id=campaign,
            kind="update",
            wave=0,
            offer=0,
            device_timeout_s=3600,
            retry_limit=3,
            finished_after=after,
        )

    async with pool.acquire() as blocker:
        held = blocker.transaction()
        await held.start()
        # the first report draws its finish number, then waits (here: for the device's row)
        await blocker.execute(
            "SELECT 1 FROM device.devices WHERE tenant = 'acme' AND device_id = $1 FOR UPDATE", first
        )
        slow = asyncio.create_task(devices.report_job("acme", first, campaign, "update", "succeeded", None))
        await eventually(partial(waiting_on_a_lock, pool, "UPDATE device.devices SET firmware_version"), bool)
        await devices.report_job("acme", second, campaign, "update", "succeeded", None)
        reading = asyncio.create_task(env.run(devices.rollout_tick, tick(0)))

        async def read_or_waiting() -> bool:
            return reading.done() or await waiting_on_a_lock(pool, "FROM device.rollouts")

        await eventually(read_or_waiting, bool)
        await held.rollback()  # the first report commits now
    await slow
    one: TickResult = await reading
    two: TickResult = await env.run(devices.rollout_tick, tick(one.finished_through or 0))
    assert sorted(job.device_id for job in one.finished + two.finished) == [first, second]
