"""Status rules shared by the device service's activities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from temporalio.exceptions import ApplicationError

from activities import device_facade
from fleetflow.contracts.devices import DeviceSpec, DeviceStatus
from fleetflow.contracts.tenants import TenantLimits
from fleetflow.tenant_profiles import read_profile

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

# statuses a new onboarding may take over; anything else belongs to a live device
REUSABLE = (DeviceStatus.FAILED.value,)


# first key of the advisory lock under which a tenant's devices are counted and registered
DEVICE_QUOTA_LOCK = 0x0DE7


@dataclass
class DeviceRoom:
    """The devices a tenant may still register in this transaction (`left` None: no limit)."""

    limit: int
    left: int | None

    def take(self) -> str | None:
        """Take the room for one more device; the refusal's reason when there is none."""
        if self.left is None:
            return None
        if self.left <= 0:
            return f"quota max_devices exceeded: the tenant may have at most {self.limit} devices"
        self.left -= 1
        return None


async def device_room(conn: Conn, tenant: str, defaults: TenantLimits) -> DeviceRoom:
    """The tenant's room under its max_devices, counted under a per-tenant lock held until the
    caller's transaction ends. The API checks the count before it starts an onboarding, but its
    devices are registered later by workflows: without this, requests sent before the earlier
    ones registered their devices (bulk imports back to back) all passed the API's check."""
    limit = (await read_profile(conn, tenant)).over(defaults).max_devices
    if limit <= 0:
        return DeviceRoom(limit, None)
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", DEVICE_QUOTA_LOCK, tenant)
    return DeviceRoom(limit, limit - await device_facade.count_devices(conn, tenant))


def refuse(message: str, kind: str) -> ApplicationError:
    """A business error: retrying cannot help, so the saga compensates at once."""
    return ApplicationError(message, type=kind, non_retryable=True)


async def set_status(
    conn: Conn,
    tenant: str,
    device_id: str,
    to_status: DeviceStatus,
    *,
    actor: str,
    reason: str | None = None,
    only_from: tuple[str, ...] | None = None,
    onboarding_id: str | None = None,
    firmware_version: str | None = None,
) -> bool:
    """Move a device to to_status and record the change; False when nothing matched."""
    row = await conn.fetchrow(
        """UPDATE device.devices d SET status = $3, status_reason = $4, updated_at = now(),
               firmware_version = coalesce($7, d.firmware_version)
           FROM (SELECT status FROM device.devices WHERE tenant = $1 AND device_id = $2
                 FOR UPDATE) old
           WHERE d.tenant = $1 AND d.device_id = $2 AND d.status <> $3
             AND ($5::text[] IS NULL OR d.status = ANY($5))
             AND ($6::text IS NULL OR d.onboarding_id = $6)
           RETURNING old.status AS from_status""",
        tenant,
        device_id,
        to_status.value,
        reason,
        list(only_from) if only_from else None,
        onboarding_id,
        firmware_version,
    )
    if row is None:
        return False
    await conn.execute(
        """INSERT INTO device.status_changes (tenant, device_id, from_status, to_status, reason, actor)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        tenant,
        device_id,
        row["from_status"],
        to_status.value,
        reason,
        actor,
    )
    return True


async def register_device(
    conn: Conn,
    tenant: str,
    spec: DeviceSpec,
    status: DeviceStatus,
    *,
    onboarding_id: str,
    actor: str,
    from_status: str | None,
    from_owner: str | None = None,
    reason: str | None = None,
) -> bool:
    """Register the device (or take over the registration read as from_status/from_owner) in
    `status`, and record the change; False (nothing written) when the row is no longer what was
    read: another onboarding registered the device meanwhile (a row that did not exist may be
    inserted by a concurrent transaction, which no `FOR UPDATE` could lock).

    Taking over revokes every credential an earlier attempt left live: a failed device holds
    none by rights, and the new attempt issues its own.
    """
    taken = await conn.fetchval(
        """INSERT INTO device.devices (tenant, device_id, device_type, firmware_version, tags,
               metadata, status, onboarding_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (tenant, device_id) DO UPDATE SET device_type = $3,
               firmware_version = $4, tags = $5, metadata = $6, status = $7,
               status_reason = NULL, onboarding_id = $8, updated_at = now()
           WHERE device.devices.status = $9 AND device.devices.onboarding_id = $10
           RETURNING true""",
        tenant,
        spec.device_id,
        spec.device_type,
        spec.firmware_version,
        spec.tags,
        spec.metadata,
        status.value,
        onboarding_id,
        from_status,
        from_owner,
    )
    if not taken:
        return False
    if from_status is not None:
        await conn.execute(
            """UPDATE device.credentials SET revoked_at = now()
               WHERE tenant = $1 AND device_id = $2 AND revoked_at IS NULL""",
            tenant,
            spec.device_id,
        )
    await conn.execute(
        """INSERT INTO device.status_changes (tenant, device_id, from_status, to_status, reason, actor)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        tenant,
        spec.device_id,
        from_status,
        status.value,
        reason,
        actor,
    )
    return True
