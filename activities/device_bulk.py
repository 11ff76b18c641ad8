"""Bulk provisioning of the device service: up to thousands of devices per activity.

Part of the device service (the `device` task queue, the `device` schema): DeviceService
holds one and serves `provision_batch` / `deprovision_batch` through it. Each device of a
slice is all-or-nothing (its own savepoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
from temporalio import activity

from activities.device_reads import DeviceReadModel
from activities.device_state import REUSABLE, DeviceRoom, device_room, refuse
from fleetflow import claim_checks, config_schema
from fleetflow.contracts.devices import (
    BulkChunk,
    BulkChunkResult,
    DeviceBatch,
    DeviceFailure,
    DeviceSpec,
    DeviceTypeView,
)
from fleetflow.contracts.tenants import TenantLimits
from fleetflow.db import Pool
from fleetflow.keys import KeyRing
from fleetflow.security import issue_device_credential, token_hash

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]


# a failure's reason travels in the slice's result (workflow history): bounded
MAX_REASON = 200
_DEVICE_FIELDS = (
    "device_id",
    "device_type",
    "firmware_version",
    "tags",
    "metadata",
    "from_status",
    "from_owner",
)


@dataclass
class _SlicePlan:
    """A slice decided in memory: each device's refusal (None: goes ahead) in input order, and
    the rows of the devices it registers (`new`: their ids)."""

    outcomes: list[str | None] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    new: set[str] = field(default_factory=set)
    kid: str = ""  # the key that signs the slice's credentials


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

        Each device is all-or-nothing: a device that fails leaves nothing behind, and the others
        go on. A retry finds its own earlier work. The slice is decided in memory and written
        set-based (a handful of statements whatever its size, not a statement pair per device),
        in one transaction; it heartbeats as it goes, and a cancelled slice rolls back and
        commits nothing.
        """
        rows = await claim_checks.array_slice(
            self.pool, chunk.claim_id, chunk.tenant, chunk.offset, chunk.limit
        )
        if rows is None:
            raise refuse(f"claim {chunk.claim_id} not found", "ClaimMissing")
        types = {t.name: t for t in await self.reads.device_types(chunk.tenant)}
        specs = [DeviceSpec.model_validate(raw) for raw in rows]
        async with self.pool.acquire() as conn, conn.transaction():
            room = await device_room(conn, chunk.tenant, self.quota_defaults)
            current = {
                r["device_id"]: r
                for r in await conn.fetch(
                    """SELECT device_id, status, onboarding_id FROM device.devices
                       WHERE tenant = $1 AND device_id = ANY($2::text[])""",
                    chunk.tenant,
                    [spec.device_id for spec in specs],
                )
            }
            plan = self._plan(chunk, specs, types, room, current)
            activity.heartbeat(len(specs))
            taken = await self._write(conn, chunk, plan)
        ok: list[str] = []
        failed: list[DeviceFailure] = []
        for i, (spec, outcome) in enumerate(zip(specs, plan.outcomes, strict=True)):
            if outcome is None and (spec.device_id in taken or spec.device_id not in plan.new):
                ok.append(spec.device_id)
                continue
            reason = outcome or "already registered (by another onboarding)"
            failed.append(
                DeviceFailure(index=chunk.offset + i, device_id=spec.device_id, reason=reason[:MAX_REASON])
            )
        return BulkChunkResult(onboarded=ok, failed=failed)

    def _plan(
        self,
        chunk: BulkChunk,
        specs: list[DeviceSpec],
        types: dict[str, DeviceTypeView],
        room: DeviceRoom,
        current: dict[str, asyncpg.Record],
    ) -> _SlicePlan:
        """What the slice writes: each device's refusal (None: it goes ahead) and the rows of those
        that go ahead, decided in memory from the rows read under the tenant's quota lock."""
        # one key signs the whole slice: its kid is known, not parsed back out of each token
        plan = _SlicePlan(kid=self.keys.signing_key().kid)
        # a config shared by many devices is checked once (one validation may take up to 20,000
        # schema steps; a slice of 1,000 devices must not take 1,000 of them)
        resolved: dict[str, dict[str, Any] | str] = {}
        for i, spec in enumerate(specs):
            activity.heartbeat(i)
            plan.outcomes.append(self._plan_one(chunk, spec, types, room, current, resolved, plan))
        return plan

    def _plan_one(
        self,
        chunk: BulkChunk,
        spec: DeviceSpec,
        types: dict[str, DeviceTypeView],
        room: DeviceRoom,
        current: dict[str, asyncpg.Record],
        resolved: dict[str, dict[str, Any] | str],
        plan: _SlicePlan,
    ) -> str | None:
        kind = types.get(spec.device_type)
        if kind is None:
            return f"unknown device type {spec.device_type!r}"
        pair = json.dumps([spec.device_type, spec.config], sort_keys=True)
        if pair not in resolved:
            try:
                resolved[pair] = config_schema.resolve(spec.config, kind.default_config, kind.config_schema)
            except config_schema.ConfigError as exc:
                resolved[pair] = str(exc)
        config = resolved[pair]
        if isinstance(config, str):
            return config
        if spec.device_id in plan.new:
            return None  # listed twice in the slice: its first entry registers it
        row = current.get(spec.device_id)
        if row is not None and row["onboarding_id"] == chunk.bulk_id:
            return None  # done by an earlier attempt of this batch
        if row is not None and row["status"] not in REUSABLE:
            return f"already registered ({row['status']})"
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
            kid=plan.kid,
        )
        plan.new.add(spec.device_id)
        plan.devices.append(
            {
                "device_id": spec.device_id,
                "device_type": spec.device_type,
                "firmware_version": spec.firmware_version,
                "tags": spec.tags,
                "metadata": spec.metadata,
                "from_status": row["status"] if row else None,
                "from_owner": row["onboarding_id"] if row else None,
                "config": config,
                "jti": jti,
                "token_hash": token_hash(token),
                "kid": plan.kid,
                "expires_at": expires_at.isoformat(),
            }
        )
        return None

    @staticmethod
    async def _write(conn: Conn, chunk: BulkChunk, plan: _SlicePlan) -> set[str]:
        """Write the planned devices set-based; the ids actually taken. A row that is no longer
        what was read (a concurrent onboarding registered the device meanwhile) is not taken,
        and nothing else of that device is written."""
        if not plan.devices:
            return set()
        # new devices are inserted; failed ones are taken over only if still as read
        taken = await conn.fetch(
            """WITH input AS (SELECT * FROM jsonb_to_recordset($3::jsonb) AS x(device_id text,
                   device_type text, firmware_version text, tags jsonb, metadata jsonb,
                   from_status text, from_owner text)),
               inserted AS (
                   INSERT INTO device.devices (tenant, device_id, device_type, firmware_version,
                       tags, metadata, status, onboarding_id)
                   SELECT $1, device_id, device_type, firmware_version,
                          ARRAY(SELECT jsonb_array_elements_text(tags)), metadata, 'active', $2
                   FROM input WHERE from_status IS NULL
                   ON CONFLICT (tenant, device_id) DO NOTHING
                   RETURNING device_id, NULL::text AS from_status),
               updated AS (
                   UPDATE device.devices d SET device_type = i.device_type,
                       firmware_version = i.firmware_version,
                       tags = ARRAY(SELECT jsonb_array_elements_text(i.tags)), metadata = i.metadata,
                       status = 'active', status_reason = NULL, onboarding_id = $2, updated_at = now()
                   FROM input i
                   WHERE i.from_status IS NOT NULL AND d.tenant = $1 AND d.device_id = i.device_id
                     AND d.status = i.from_status AND d.onboarding_id = i.from_owner
                   RETURNING d.device_id, i.from_status)
               SELECT device_id, from_status FROM inserted
               UNION ALL SELECT device_id, from_status FROM updated""",
            chunk.tenant,
            chunk.bulk_id,
            [{k: d[k] for k in _DEVICE_FIELDS} for d in plan.devices],
        )
        activity.heartbeat(len(plan.devices))
        ids = {r["device_id"] for r in taken}
        rows = [d for d in plan.devices if d["device_id"] in ids]
        taken_over = [r["device_id"] for r in taken if r["from_status"] is not None]
        if taken_over:  # a failed device holds no live credential by rights; the import issues its own
            await conn.execute(
                """UPDATE device.credentials SET revoked_at = now()
                   WHERE tenant = $1 AND device_id = ANY($2::text[]) AND revoked_at IS NULL""",
                chunk.tenant,
                taken_over,
            )
        await conn.execute(
            """INSERT INTO device.status_changes (tenant, device_id, from_status, to_status, reason, actor)
               SELECT $1, device_id, from_status, 'active', 'bulk onboarding', $2
               FROM unnest($3::text[], $4::text[]) AS x(device_id, from_status)""",
            chunk.tenant,
            chunk.actor,
            [r["device_id"] for r in taken],
            [r["from_status"] for r in taken],
        )
        await conn.execute(
            """INSERT INTO device.credentials (jti, tenant, device_id, token_hash, issued_at,
                   expires_at, kid)
               SELECT jti, $1, device_id, token_hash, $2, expires_at, kid
               FROM jsonb_to_recordset($3::jsonb) AS x(jti text, device_id text, token_hash text,
                   expires_at timestamptz, kid text)
               ON CONFLICT (jti) DO NOTHING""",
            chunk.tenant,
            chunk.issued_at,
            [{k: d[k] for k in ("jti", "device_id", "token_hash", "expires_at", "kid")} for d in rows],
        )
        await conn.execute(
            """INSERT INTO device.configurations (tenant, device_id, config)
               SELECT $1, device_id, config
               FROM jsonb_to_recordset($2::jsonb) AS x(device_id text, config jsonb)
               ON CONFLICT (tenant, device_id) DO UPDATE SET config = EXCLUDED.config, updated_at = now()""",
            chunk.tenant,
            [{"device_id": d["device_id"], "config": d["config"]} for d in rows],
        )
        return ids

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
