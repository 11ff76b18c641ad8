"""Onboardings racing each other or a decommissioning, on the real device service and database.

Another onboarding's transaction (a bulk slice: device row and live credential, not yet
committed) is held open by hand while the service registers the same device: the service's
read finds no row, its insert waits on the other's, and the other then commits.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.devices import DeviceService
from fleetflow.contracts.devices import BulkChunk, DeviceBatch, DeviceSpec, RegisterDevice
from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.flows import new_id
from tests.support import eventually

OTHER = "other-bulk/run-1"


async def inserts_waiting(pool: Pool) -> int:
    """Sessions whose insert into device.devices waits for a lock."""
    count: int = await pool.fetchval(
        """SELECT count(*) FROM pg_stat_activity
           WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO device.devices%'"""
    )
    return count


@pytest.fixture
async def other_onboarding(pool: Pool) -> AsyncIterator[tuple[str, str, asyncio.Event]]:
    """(device id, live jti) another onboarding has written but not committed; set the event to commit."""
    device_id, jti = new_id("race"), f"{OTHER}:{uuid.uuid4().hex}"
    commit = asyncio.Event()

    async def hold() -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO device.devices (tenant, device_id, device_type, firmware_version,
                       status, onboarding_id) VALUES ('acme', $1, 'sensor', '1.0.0', 'active', $2)""",
                device_id,
                OTHER,
            )
            now = datetime.now(UTC)
            await conn.execute(
                """INSERT INTO device.credentials (jti, tenant, device_id, token_hash, issued_at, expires_at)
                   VALUES ($1, 'acme', $2, 'hash', $3, $4)""",
                jti,
                device_id,
                now,
                now + timedelta(days=1),
            )
            await commit.wait()

    holder = asyncio.create_task(hold())
    yield device_id, jti, commit
    commit.set()
    await holder


async def assert_untouched(pool: Pool, device_id: str, jti: str) -> None:
    row = await pool.fetchrow(
        "SELECT status, onboarding_id FROM device.devices WHERE tenant = 'acme' AND device_id = $1",
        device_id,
    )
    assert row is not None and (row["status"], row["onboarding_id"]) == ("active", OTHER)
    revoked = await pool.fetchval("SELECT revoked_at FROM device.credentials WHERE jti = $1", jti)
    assert revoked is None
    mine = await pool.fetchval(
        "SELECT count(*) FROM device.credentials WHERE tenant = 'acme' AND device_id = $1 AND jti <> $2",
        device_id,
        jti,
    )
    assert mine == 0  # no second live credential beside the other onboarding's


async def test_a_registration_racing_another_onboarding_does_not_take_its_device(
    pool: Pool, settings: Settings, other_onboarding: tuple[str, str, asyncio.Event]
) -> None:
    device_id, jti, commit = other_onboarding
    devices = DeviceService(pool, settings)
    request = RegisterDevice(
        tenant="acme",
        spec=DeviceSpec(device_id=device_id, device_type="sensor"),
        onboarding_id=f"onboard-acme-{device_id}/run-2",
        actor="test",
    )
    before = await inserts_waiting(pool)
    register = asyncio.create_task(devices.register(request))
    await eventually(lambda: inserts_waiting(pool), lambda n: n > before)
    commit.set()
    with pytest.raises(ApplicationError) as refused:
        await register
    assert refused.value.type == "DeviceExists"
    await assert_untouched(pool, device_id, jti)


async def test_a_bulk_slice_racing_another_onboarding_reports_the_device_failed(
    pool: Pool, settings: Settings, other_onboarding: tuple[str, str, asyncio.Event]
) -> None:
    device_id, jti, commit = other_onboarding
    devices = DeviceService(pool, settings)
    claim = f"race-{uuid.uuid4().hex[:12]}"
    await pool.execute(
        """INSERT INTO fleetflow.claim_checks (claim_id, tenant, kind, body)
           VALUES ($1, 'acme', 'bulk-onboarding', $2)""",
        claim,
        [{"device_id": device_id, "device_type": "sensor"}],
    )
    now = datetime.now(UTC)
    chunk = BulkChunk(
        tenant="acme",
        bulk_id=f"{claim}/run-1",
        claim_id=claim,
        offset=0,
        limit=1,
        actor="test",
        issued_at=now,
        expires_at=now + timedelta(days=1),
    )
    before = await inserts_waiting(pool)
    provision = asyncio.create_task(ActivityEnvironment().run(devices.provision_batch, chunk))
    await eventually(lambda: inserts_waiting(pool), lambda n: n > before)
    commit.set()
    result = await provision
    assert result.onboarded == [] and [f.device_id for f in result.failed] == [device_id]
    await assert_untouched(pool, device_id, jti)


async def test_undoing_a_bulk_import_leaves_a_device_decommissioned_meanwhile_retired(
    pool: Pool, settings: Settings
) -> None:
    # a device of a running import is decommissioned, then the import fails or is cancelled
    device_id, owner = new_id("retired"), f"bulk-{uuid.uuid4().hex[:8]}/run-1"
    await pool.execute(
        """INSERT INTO device.devices (tenant, device_id, device_type, firmware_version, status,
               onboarding_id) VALUES ('acme', $1, 'sensor', '1.0.0', 'decommissioned', $2)""",
        device_id,
        owner,
    )
    devices = DeviceService(pool, settings)
    await devices.deprovision_batch(
        DeviceBatch(tenant="acme", bulk_id=owner, reason="bulk onboarding cancelled", actor="test")
    )
    status = await pool.fetchval(
        "SELECT status FROM device.devices WHERE tenant = 'acme' AND device_id = $1", device_id
    )
    assert status == "decommissioned"  # `failed` would let it be onboarded again
