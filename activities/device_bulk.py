"""Bulk provisioning of the device service: up to thousands of devices per activity.

Part of the device service (the `device` task queue, the `device` schema): DeviceService
holds one and serves `provision_batch` / `deprovision_batch` through it. Each device of a
slice is all-or-nothing (its own savepoint).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
from temporalio import activity

from activities.device_reads import DeviceReadModel
from activities.device_state import REUSABLE, DeviceRoom, device_room, refuse, register_device
from fleetflow import claim_checks, config_schema
from fleetflow.contracts.devices import (
    BulkChunk,
    BulkChunkResult,
    DeviceBatch,
    DeviceFailure,
    DeviceSpec,
    DeviceStatus,
    DeviceTypeView,
)
from fleetflow.contracts.tenants import TenantLimits
from fleetflow.db import Pool
from fleetflow.keys import KeyRing
from fleetflow.security import issue_device_credential, kid_of, token_hash

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]


# a failure's reason travels in the slice's result (workflow history): bounded
MAX_REASON = 200


class BulkProvisioning:
    """Bulk imports: a part of DeviceService, which serves the bulk activities through it."""

    def __init__(
        self, pool: Pool, reads: DeviceReadModel, keys: KeyRing, issuer: str, quota_defaults: TenantLimits
    ) -> None:
        self.pool = pool
        self.reads = reads
        self.keys = keys
        self.issuer = issuer
        self.quota_defaults = quota_defaults

    async def provision_batch(self, chunk: BulkChunk) -> BulkChunkResult:
        """Register, credential, configure and activate one slice of a bulk import.

        Each device is all-or-nothing (its own savepoint): a device that fails leaves
        nothing behind, and the others go on. A retry finds its own earlier work. It heartbeats
        per device: a cancelled slice rolls back and commits nothing.
        """
        rows = await claim_checks.array_slice(
            self.pool, chunk.claim_id, chunk.tenant, chunk.offset, chunk.limit
        )
        if rows is None:
            raise refuse(f"claim {chunk.claim_id} not found", "ClaimMissing")
        types = {t.name: t for t in await self.reads.device_types(chunk.tenant)}
        ok: list[str] = []
        failed: list[DeviceFailure] = []
        async with self.pool.acquire() as conn, conn.transaction():
            room = await device_room(conn, chunk.tenant, self.quota_defaults)
            resolved: dict[str, dict[str, Any] | str] = {}  # a config shared by many devices: checked once
            for i, raw in enumerate(rows):
                activity.heartbeat(i)
                index = chunk.offset + i
                spec = DeviceSpec.model_validate(raw)
                reason = await self._provision_one(conn, chunk, spec, types, room, resolved)
                if reason is None:
                    ok.append(spec.device_id)
                else:
                    failed.append(
                        DeviceFailure(index=index, device_id=spec.device_id, reason=reason[:MAX_REASON])
                    )
        return BulkChunkResult(onboarded=ok, failed=failed)

    async def _provision_one(
        self,
        conn: Conn,
        chunk: BulkChunk,
        spec: DeviceSpec,
        types: dict[str, DeviceTypeView],
        room: DeviceRoom,
        resolved: dict[str, dict[str, Any] | str],
    ) -> str | None:
        kind = types.get(spec.device_type)
        if kind is None:
            return f"unknown device type {spec.device_type!r}"
        # the API checks a config shared by devices once: so does this (one validation may take
        # up to 20,000 schema steps; a slice of 1,000 devices must not take 1,000 of them)
        pair = json.dumps([spec.device_type, spec.config], sort_keys=True)
        if pair not in resolved:
            try:
                resolved[pair] = config_schema.resolve(spec.config, kind.default_config, kind.config_schema)
            except config_schema.ConfigError as exc:
                resolved[pair] = str(exc)
        config = resolved[pair]
        if isinstance(config, str):
            return config
        current = await conn.fetchrow(
            "SELECT status, onboarding_id FROM device.devices WHERE tenant = $1 AND device_id = $2",
            chunk.tenant,
            spec.device_id,
        )
        if current is not None and current["onboarding_id"] == chunk.bulk_id:
            return None  # done by an earlier attempt of this batch
        if current is not None and current["status"] not in REUSABLE:
            return f"already registered ({current['status']})"
        over = room.take()
        if over is not None:
            return over
        jti = f"{chunk.bulk_id}:{spec.device_id}"
        expires_at = chunk.expires_at
        if chunk.lifetime_per_type and kind.credential_lifetime_days is not None:
            expires_at = chunk.issued_at + timedelta(days=kind.credential_lifetime_days)
        token = issue_device_credential(
            self.keys,
            tenant=chunk.tenant,
            device_id=spec.device_id,
            jti=jti,
            issued_at=chunk.issued_at,
            expires_at=expires_at,
            issuer=self.issuer,
        )
        async with conn.transaction():
            taken = await register_device(
                conn,
                chunk.tenant,
                spec,
                DeviceStatus.ACTIVE,
                onboarding_id=chunk.bulk_id,
                actor=chunk.actor,
                from_status=current["status"] if current else None,
                from_owner=current["onboarding_id"] if current else None,
                reason="bulk onboarding",
            )
            if not taken:  # another onboarding registered it since it was read
                return "already registered (by another onboarding)"
            await conn.execute(
                """INSERT INTO device.credentials (jti, tenant, device_id, token_hash, issued_at,
                       expires_at, kid) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (jti) DO NOTHING""",
                jti,
                chunk.tenant,
                spec.device_id,
                token_hash(token),
                chunk.issued_at,
                expires_at,
                kid_of(token),
            )
            await conn.execute(
                """INSERT INTO device.configurations (tenant, device_id, config) VALUES ($1, $2, $3)
                   ON CONFLICT (tenant, device_id) DO UPDATE SET config = $3, updated_at = now()""",
                chunk.tenant,
                spec.device_id,
                config,
            )
        return None

    async def deprovision_batch(self, batch: DeviceBatch) -> None:
        """Compensation of `provision_batch` for the given devices of this bulk import (None: all).

        Set-based, a few statements whatever the count: undoing 10,000 devices one statement
        pair each could outlast the compensation's start-to-close timeout and retry for ever.
        A device decommissioned meanwhile stays so (as `mark_failed` leaves it): `failed` would
        let it be onboarded again.
        """
        owner, ids = batch.bulk_id, batch.device_ids
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """UPDATE device.credentials SET revoked_at = now()
                   WHERE tenant = $1 AND jti LIKE $2 || ':%' AND revoked_at IS NULL
                     AND ($3::text[] IS NULL OR device_id = ANY($3))""",
                batch.tenant,
                owner,
                ids,
            )
            await conn.execute(
                """DELETE FROM device.configurations c USING device.devices d
                   WHERE c.tenant = $1 AND d.tenant = c.tenant AND d.device_id = c.device_id
                     AND d.onboarding_id = $2 AND ($3::text[] IS NULL OR c.device_id = ANY($3))""",
                batch.tenant,
                owner,
                ids,
            )
            await conn.execute(
                """WITH old AS (
                       SELECT device_id, status FROM device.devices
                       WHERE tenant = $1 AND onboarding_id = $2
                         AND status IN ('pending', 'provisioned', 'active')
                         AND ($3::text[] IS NULL OR device_id = ANY($3))
                       FOR UPDATE),
                   moved AS (
                       UPDATE device.devices d SET status = 'failed', status_reason = $4,
                           updated_at = now()
                       FROM old WHERE d.tenant = $1 AND d.device_id = old.device_id
                       RETURNING d.device_id, old.status AS from_status)
                   INSERT INTO device.status_changes
                       (tenant, device_id, from_status, to_status, reason, actor)
                   SELECT $1, device_id, from_status, 'failed', $4, $5 FROM moved""",
                batch.tenant,
                owner,
                ids,
                batch.reason,
                batch.actor,
            )

    async def bulk_credentials(self, tenant: str, bulk_id: str) -> list[tuple[str, str]]:
        """(device id, credential) of every live device of a bulk import, re-signed from its claims."""
        rows = await self.pool.fetch(
            # owner: `<bulk id>` (before attempts) or `<bulk id>/<run>`; jti: `<owner>:<device>`
            """SELECT c.device_id, c.jti, c.issued_at, c.expires_at, c.kid FROM device.credentials c
               JOIN device.devices d USING (tenant, device_id)
               WHERE c.tenant = $1 AND split_part(d.onboarding_id, '/', 1) = $2
                 AND c.jti LIKE d.onboarding_id || ':%'
                 AND c.revoked_at IS NULL AND c.valid_until IS NULL ORDER BY c.device_id""",
            tenant,
            bulk_id,
        )
        return [
            (
                r["device_id"],
                issue_device_credential(
                    self.keys,
                    tenant=tenant,
                    device_id=r["device_id"],
                    jti=r["jti"],
                    issued_at=r["issued_at"],
                    expires_at=r["expires_at"],
                    issuer=self.issuer,
                    kid=r["kid"],
                ),
            )
            for r in rows
        ]
