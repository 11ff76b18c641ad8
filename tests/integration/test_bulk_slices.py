"""A bulk slice written set-based (device.provision_batch), on the real device service and
database: a retry after the commit, two slices at the quota's edge, two tenants with the same
ids, and a take-over of a failed device racing its decommissioning."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.testing import ActivityEnvironment

from activities.devices import DeviceService
from fleetflow.contracts.devices import BulkChunk, BulkChunkResult
from fleetflow.contracts.tenants import TenantProfile
from fleetflow.db import Pool
from fleetflow.settings import Settings
from fleetflow.tenant_profiles import write_profile
from tests.integration.flows import new_id
from tests.support import eventually


async def slice_of(pool: Pool, tenant: str, specs: list[dict[str, Any]]) -> BulkChunk:
    """One slice of a bulk import of specs, its device list stored as the API stores it."""
    claim = f"slice-{uuid.uuid4().hex[:12]}"
    await pool.execute(
        """INSERT INTO fleetflow.claim_checks (claim_id, tenant, kind, body)
           VALUES ($1, $2, 'bulk-onboarding', $3)""",
        claim,
        tenant,
        specs,
    )
    now = datetime.now(UTC)
    return BulkChunk(
        tenant=tenant,
        bulk_id=f"{claim}/run-1",
        claim_id=claim,
        offset=0,
        limit=len(specs),
        actor="test",
        issued_at=now,
        expires_at=now + timedelta(days=1),
    )


async def provision(devices: DeviceService, chunk: BulkChunk) -> BulkChunkResult:
    return await ActivityEnvironment().run(devices.provision_batch, chunk)


async def failed_device(pool: Pool, device_id: str, owner: str) -> None:
    """A device an earlier onboarding left `failed`, with a credential it left live."""
    await pool.execute(
        """INSERT INTO device.devices (tenant, device_id, device_type, firmware_version, status,
               onboarding_id) VALUES ('acme', $1, 'sensor', '1.0.0', 'failed', $2)""",
        device_id,
        owner,
    )
    now = datetime.now(UTC)
    await pool.execute(
        """INSERT INTO device.credentials (jti, tenant, device_id, token_hash, issued_at, expires_at)
           VALUES ($1, 'acme', $2, 'hash', $3, $4)""",
        f"{owner}:{device_id}",
        device_id,
        now,
        now + timedelta(days=1),
    )


async def test_a_slice_retried_after_its_commit_gives_the_same_outcome_and_no_second_write(
    pool: Pool, settings: Settings
) -> None:
    # the worker died after the commit: the retry reads the slice's own rows
    devices = DeviceService(pool, settings)
    ids = [new_id("retry") for _ in range(5)]
    await failed_device(pool, ids[0], "earlier-bulk/run-1")
    specs = [{"device_id": d, "device_type": "sensor"} for d in ids]
    chunk = await slice_of(pool, "acme", [*specs, {"device_id": new_id("bad"), "device_type": "nope"}])
    first = await provision(devices, chunk)
    again = await provision(devices, chunk)
    assert first == again and first.onboarded == ids and len(first.failed) == 1
    live = await pool.fetch(
        """SELECT device_id, count(*) AS n FROM device.credentials
           WHERE tenant = 'acme' AND device_id = ANY($1) AND revoked_at IS NULL GROUP BY 1""",
        ids,
    )
    assert {r["device_id"]: r["n"] for r in live} == dict.fromkeys(ids, 1)  # the earlier one revoked
    changes = await pool.fetchval(
        "SELECT count(*) FROM device.status_changes WHERE tenant = 'acme' AND device_id = ANY($1)", ids
    )
    configs = await pool.fetchval(
        "SELECT count(*) FROM device.configurations WHERE tenant = 'acme' AND device_id = ANY($1)", ids
    )
    assert (changes, configs) == (5, 5)


async def test_two_slices_at_the_quota_edge_register_one_device_between_them(
    pool: Pool, settings: Settings
) -> None:
    tenant = f"edge-{uuid.uuid4().hex[:8]}"
    await write_profile(pool, tenant, TenantProfile(max_devices=3), "test")
    devices = DeviceService(pool, settings)
    head = [{"device_id": f"a{i}", "device_type": "sensor"} for i in range(2)]
    assert len((await provision(devices, await slice_of(pool, tenant, head))).onboarded) == 2
    slices = [
        await slice_of(pool, tenant, [{"device_id": f"{p}{i}", "device_type": "sensor"} for i in range(500)])
        for p in "bc"
    ]
    results = await asyncio.gather(*(provision(devices, s) for s in slices))
    assert sum(len(r.onboarded) for r in results) == 1
    assert all("quota max_devices exceeded" in f.reason for r in results for f in r.failed)
    counted = await pool.fetchval(
        """SELECT count(*) FROM device.devices
           WHERE tenant = $1 AND status NOT IN ('failed', 'decommissioned')""",
        tenant,
    )
    assert counted == 3


async def test_two_tenants_bulk_onboard_the_same_device_id(pool: Pool, settings: Settings) -> None:
    devices = DeviceService(pool, settings)
    device_id, other = new_id("same"), f"other-{uuid.uuid4().hex[:8]}"
    spec = [{"device_id": device_id, "device_type": "sensor"}]
    assert (await provision(devices, await slice_of(pool, "acme", spec))).onboarded == [device_id]
    assert (await provision(devices, await slice_of(pool, other, spec))).onboarded == [device_id]


async def test_a_take_over_racing_the_decommissioning_of_a_failed_device_reports_it_failed(
    pool: Pool, settings: Settings
) -> None:
    devices = DeviceService(pool, settings)
    device_id = new_id("retiring")
    await failed_device(pool, device_id, "earlier-bulk/run-1")
    updated, commit = asyncio.Event(), asyncio.Event()

    async def decommission() -> None:  # not committed until the slice waits for it
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """UPDATE device.devices SET status = 'decommissioned'
                   WHERE tenant = 'acme' AND device_id = $1""",
                device_id,
            )
            updated.set()
            await commit.wait()

    async def slice_waiting() -> int:
        count: int = await pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity
               WHERE wait_event_type = 'Lock' AND query LIKE '%jsonb_to_recordset%'"""
        )
        return count

    holder = asyncio.create_task(decommission())
    await updated.wait()
    chunk = await slice_of(pool, "acme", [{"device_id": device_id, "device_type": "sensor"}])
    running = asyncio.create_task(provision(devices, chunk))
    await eventually(slice_waiting, lambda n: n > 0)
    commit.set()
    await holder
    result = await running
    assert result.onboarded == [] and [f.device_id for f in result.failed] == [device_id]
    status = await pool.fetchval(
        "SELECT status FROM device.devices WHERE tenant = 'acme' AND device_id = $1", device_id
    )
    mine = await pool.fetchval(
        "SELECT count(*) FROM device.credentials WHERE tenant = 'acme' AND jti LIKE $1 || ':%'",
        chunk.bulk_id,
    )
    assert (status, mine) == ("decommissioned", 0)
