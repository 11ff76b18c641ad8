"""The device service's onboarding writes, each on a connection inside the caller's transaction.

`DeviceService` runs them one per activity (`register`, `issue_credential`, `store_config`) or
all in one transaction (`provision_device`). Each is idempotent for the same onboarding: a retry
finds its own earlier work and writes nothing more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

from activities.device_state import REUSABLE, device_room, refuse, register_device, set_status
from fleetflow.contracts.devices import (
    DeviceStatus,
    IssueCredential,
    IssuedCredential,
    RegisterDevice,
    StoreConfig,
    business_id_of,
)
from fleetflow.contracts.tenants import TenantLimits
from fleetflow.keys import KeyRing
from fleetflow.security import issue_device_credential, kid_of, token_hash

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]


async def register_on(conn: Conn, request: RegisterDevice, quota_defaults: TenantLimits) -> None:
    """Register the device as `pending` for this onboarding (or find it already so)."""
    spec = request.spec
    current = await conn.fetchrow(
        """SELECT status, onboarding_id FROM device.devices
           WHERE tenant = $1 AND device_id = $2 FOR UPDATE""",
        request.tenant,
        spec.device_id,
    )
    if current is not None and current["onboarding_id"] == request.onboarding_id:
        return  # a retry of this very step
    if (
        current is not None
        and current["status"] not in REUSABLE
        and not (
            # an earlier attempt of this same onboarding: its run is closed (two runs of one
            # workflow id never overlap), e.g. terminated before it could compensate
            business_id_of(current["onboarding_id"]) == business_id_of(request.onboarding_id)
            and current["status"] in (DeviceStatus.PENDING, DeviceStatus.PROVISIONED)
        )
    ):
        raise refuse(
            f"device {spec.device_id!r} is already registered ({current['status']})",
            "DeviceExists",
        )
    over = (await device_room(conn, request.tenant, quota_defaults)).take()
    if over is not None:
        raise refuse(over, "QuotaExceeded")
    taken = await register_device(
        conn,
        request.tenant,
        spec,
        DeviceStatus.PENDING,
        onboarding_id=request.onboarding_id,
        actor=request.actor,
        from_status=current["status"] if current else None,
        from_owner=current["onboarding_id"] if current else None,
    )
    if not taken:  # registered by a concurrent onboarding (a bulk import) since it was read
        raise refuse(f"device {spec.device_id!r} is already registered", "DeviceExists")


async def issue_credential_on(
    conn: Conn, request: IssueCredential, keys: KeyRing, issuer: str
) -> IssuedCredential:
    """Issue the device's credential; stored only as a hash, the token returned once."""
    # a retry signs with the key and the expiry the first attempt used: the same token, the
    # same hash (provision_device reads the expiry from the device type, which may have changed)
    earlier = await conn.fetchrow(
        "SELECT kid, expires_at FROM device.credentials WHERE jti = $1", request.jti
    )
    kid = earlier["kid"] if earlier is not None else None
    expires_at = earlier["expires_at"] if earlier is not None else request.expires_at
    token = issue_device_credential(
        keys,
        tenant=request.tenant,
        device_id=request.device_id,
        jti=request.jti,
        issued_at=request.issued_at,
        expires_at=expires_at,
        issuer=issuer,
        kid=kid,
    )
    owner = await conn.fetchrow(
        """SELECT onboarding_id, status FROM device.devices
           WHERE tenant = $1 AND device_id = $2 FOR SHARE""",
        request.tenant,
        request.device_id,
    )
    if owner is None or owner["onboarding_id"] != request.onboarding_id:
        raise refuse("device registration belongs to another onboarding", "DeviceExists")
    if owner["status"] == DeviceStatus.FAILED:  # this attempt was undone already
        raise refuse("device registration was undone", "BadTransition")
    await conn.execute(
        """INSERT INTO device.credentials (jti, tenant, device_id, token_hash, issued_at,
               expires_at, kid)
           VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (jti) DO NOTHING""",
        request.jti,
        request.tenant,
        request.device_id,
        token_hash(token),
        request.issued_at,
        expires_at,
        kid_of(token),
    )
    return IssuedCredential(jti=request.jti, token=token, expires_at=expires_at)


async def credential_issued(conn: Conn, tenant: str, device_id: str, jti: str) -> bool:
    """Whether the credential `jti` of the device was issued already (by an earlier attempt)."""
    found = await conn.fetchval(
        "SELECT 1 FROM device.credentials WHERE jti = $1 AND tenant = $2 AND device_id = $3",
        jti,
        tenant,
        device_id,
    )
    return found is not None


async def store_config_on(conn: Conn, request: StoreConfig) -> None:
    """Store the initial configuration and mark the device `provisioned`."""
    await conn.execute(
        """INSERT INTO device.configurations (tenant, device_id, config)
           VALUES ($1, $2, $3)
           ON CONFLICT (tenant, device_id) DO UPDATE SET config = $3, updated_at = now()""",
        request.tenant,
        request.device_id,
        request.config,
    )
    await set_status(
        conn,
        request.tenant,
        request.device_id,
        DeviceStatus.PROVISIONED,
        actor=request.actor,
        onboarding_id=request.onboarding_id,
        only_from=(DeviceStatus.PENDING,),
    )
