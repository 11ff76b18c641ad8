"""The device service: registry, credentials and configuration; owns the `device` schema.

Every write is an activity keyed by tenant + device id (and onboarding id), safe to
retry: a repeated call finds its own earlier work and does nothing more. The read
methods (not activities) serve the API's read model.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.probe import probe
from fleetflow import config_schema
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.devices import (
    BulkChunk,
    BulkChunkResult,
    DeviceBatch,
    DeviceFailure,
    DeviceSpec,
    DeviceStatus,
    DeviceTransition,
    DeviceTypeView,
    DeviceView,
    IssueCredential,
    IssuedCredential,
    RegisterDevice,
    RevokeCredential,
    StoreConfig,
    ValidatedOnboarding,
    ValidateOnboarding,
)
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import Unready, UnreadyDevices, WindowRef
from fleetflow.db import Pool
from fleetflow.security import issue_device_credential, token_hash
from fleetflow.settings import Settings

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

# statuses a new onboarding may take over; anything else belongs to a live device
_REUSABLE = (DeviceStatus.FAILED.value,)


def _refuse(message: str, kind: str) -> ApplicationError:
    """A business error: retrying cannot help, so the saga compensates at once."""
    return ApplicationError(message, type=kind, non_retryable=True)


async def _set_status(
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
        tenant, device_id, to_status.value, reason, list(only_from) if only_from else None,
        onboarding_id, firmware_version,
    )  # fmt: skip
    if row is None:
        return False
    await conn.execute(
        """INSERT INTO device.status_changes (tenant, device_id, from_status, to_status, reason, actor)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        tenant, device_id, row["from_status"], to_status.value, reason, actor,
    )  # fmt: skip
    return True


class DeviceService:
    """Activities of the `device` task queue, and the device read model."""

    queue = TaskQueue.DEVICE

    def __init__(self, pool: Pool, settings: Settings) -> None:
        self.pool = pool
        self.secret = settings.secret()
        self.issuer = settings.jwt_issuer

    # --- reads (API read model) ------------------------------------------------

    async def device_type(self, name: str) -> DeviceTypeView | None:
        """A device type by name, or None."""
        row = await self.pool.fetchrow("SELECT * FROM device.device_types WHERE name = $1", name)
        return None if row is None else DeviceTypeView.model_validate(dict(row.items()))

    async def device_types(self) -> list[DeviceTypeView]:
        """Every device type."""
        rows = await self.pool.fetch("SELECT * FROM device.device_types ORDER BY name")
        return [DeviceTypeView.model_validate(dict(r.items())) for r in rows]

    async def put_device_type(self, view: DeviceTypeView) -> None:
        """Create or replace a device type."""
        await self.pool.execute(
            """INSERT INTO device.device_types (name, config_schema, default_config, requires_approval)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (name) DO UPDATE SET config_schema = $2, default_config = $3,
                   requires_approval = $4""",
            view.name, view.config_schema, view.default_config, view.requires_approval,
        )  # fmt: skip

    async def resolve_config(self, spec: DeviceSpec) -> ValidatedOnboarding:
        """The configuration spec gets (type defaults merged) or ConfigError / LookupError."""
        kind = await self.device_type(spec.device_type)
        if kind is None:
            raise LookupError(f"unknown device type {spec.device_type!r}")
        config = config_schema.resolve(spec.config, kind.default_config, kind.config_schema)
        return ValidatedOnboarding(
            config=config, requires_approval=kind.requires_approval, config_schema=kind.config_schema
        )

    async def get_device(self, tenant: str, device_id: str) -> DeviceView | None:
        """A device of tenant, or None."""
        row = await self.pool.fetchrow(
            "SELECT * FROM device.devices WHERE tenant = $1 AND device_id = $2", tenant, device_id
        )
        return None if row is None else DeviceView.model_validate(dict(row.items()))

    async def list_devices(
        self,
        tenant: str,
        *,
        status: str | None,
        device_type: str | None,
        tag: str | None,
        after: str | None,
        limit: int,
    ) -> list[DeviceView]:
        """A page of tenant's devices ordered by id, after the given id."""
        rows = await self.pool.fetch(
            """SELECT * FROM device.devices
               WHERE tenant = $1 AND ($2::text IS NULL OR status = $2)
                 AND ($3::text IS NULL OR device_type = $3)
                 AND ($4::text IS NULL OR tags @> ARRAY[$4])
                 AND ($5::text IS NULL OR device_id > $5)
               ORDER BY device_id LIMIT $6""",
            tenant, status, device_type, tag, after, limit,
        )  # fmt: skip
        return [DeviceView.model_validate(dict(r.items())) for r in rows]

    async def credential_active(self, tenant: str, device_id: str, jti: str, token: str) -> bool:
        """True when the credential exists for that device, matches its hash and is not revoked."""
        row = await self.pool.fetchrow(
            """SELECT 1 FROM device.credentials
               WHERE jti = $1 AND tenant = $2 AND device_id = $3 AND token_hash = $4
                 AND revoked_at IS NULL AND expires_at > now()""",
            jti, tenant, device_id, token_hash(token),
        )  # fmt: skip
        return row is not None

    async def config_of(self, tenant: str, device_id: str) -> dict[str, Any] | None:
        """The stored configuration of a device, or None."""
        value = await self.pool.fetchval(
            "SELECT config FROM device.configurations WHERE tenant = $1 AND device_id = $2",
            tenant, device_id,
        )  # fmt: skip
        return None if value is None else dict(value)

    # --- activities ------------------------------------------------------------

    @activity.defn(name="device.ping")
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)

    @activity.defn(name="device.validate_onboarding")
    async def validate_onboarding(self, request: ValidateOnboarding) -> ValidatedOnboarding:
        """Check the device type and configuration, and that the id is free."""
        try:
            validated = await self.resolve_config(request.spec)
        except (LookupError, config_schema.ConfigError) as exc:
            raise _refuse(str(exc), "InvalidDevice") from None
        return validated

    @activity.defn(name="device.register")
    async def register(self, request: RegisterDevice) -> None:
        """Register the device as `pending` for this onboarding (or find it already so)."""
        spec = request.spec
        async with self.pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(
                """SELECT status, onboarding_id FROM device.devices
                   WHERE tenant = $1 AND device_id = $2 FOR UPDATE""",
                request.tenant, spec.device_id,
            )  # fmt: skip
            if current is not None and current["onboarding_id"] == request.onboarding_id:
                return  # a retry of this very step
            if current is not None and current["status"] not in _REUSABLE:
                raise _refuse(
                    f"device {spec.device_id!r} is already registered ({current['status']})",
                    "DeviceExists",
                )
            await conn.execute(
                """INSERT INTO device.devices (tenant, device_id, device_type, firmware_version, tags,
                       metadata, status, onboarding_id)
                   VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)
                   ON CONFLICT (tenant, device_id) DO UPDATE SET device_type = $3,
                       firmware_version = $4, tags = $5, metadata = $6, status = 'pending',
                       status_reason = NULL, onboarding_id = $7, updated_at = now()""",
                request.tenant, spec.device_id, spec.device_type, spec.firmware_version,
                spec.tags, spec.metadata, request.onboarding_id,
            )  # fmt: skip
            await conn.execute(
                """INSERT INTO device.status_changes (tenant, device_id, from_status, to_status, actor)
                   VALUES ($1, $2, $3, 'pending', $4)""",
                request.tenant, spec.device_id, current["status"] if current else None, request.actor,
            )  # fmt: skip

    @activity.defn(name="device.mark_failed")
    async def mark_failed(self, request: DeviceTransition) -> None:
        """Compensation of `register`: this onboarding's registration becomes `failed`."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _set_status(
                conn, request.tenant, request.device_id, DeviceStatus.FAILED,
                actor=request.actor, reason=request.reason, onboarding_id=request.onboarding_id,
                only_from=(DeviceStatus.PENDING, DeviceStatus.PROVISIONED, DeviceStatus.ACTIVE),
            )  # fmt: skip

    @activity.defn(name="device.issue_credential")
    async def issue_credential(self, request: IssueCredential) -> IssuedCredential:
        """Issue the device's credential; stored only as a hash, the token returned once."""
        token = issue_device_credential(
            self.secret, tenant=request.tenant, device_id=request.device_id, jti=request.jti,
            issued_at=request.issued_at, expires_at=request.expires_at, issuer=self.issuer,
        )  # fmt: skip
        async with self.pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchval(
                """SELECT onboarding_id FROM device.devices
                   WHERE tenant = $1 AND device_id = $2 FOR SHARE""",
                request.tenant, request.device_id,
            )  # fmt: skip
            if owner != request.onboarding_id:
                raise _refuse("device registration belongs to another onboarding", "DeviceExists")
            await conn.execute(
                """INSERT INTO device.credentials (jti, tenant, device_id, token_hash, issued_at,
                       expires_at)
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (jti) DO NOTHING""",
                request.jti, request.tenant, request.device_id, token_hash(token),
                request.issued_at, request.expires_at,
            )  # fmt: skip
        return IssuedCredential(jti=request.jti, token=token, expires_at=request.expires_at)

    @activity.defn(name="device.revoke_credential")
    async def revoke_credential(self, request: RevokeCredential) -> None:
        """Revoke one credential (compensation of `issue_credential`); refused at once after."""
        await self.pool.execute(
            """UPDATE device.credentials SET revoked_at = now()
               WHERE jti = $1 AND tenant = $2 AND device_id = $3 AND revoked_at IS NULL""",
            request.jti, request.tenant, request.device_id,
        )  # fmt: skip

    @activity.defn(name="device.store_config")
    async def store_config(self, request: StoreConfig) -> None:
        """Store the initial configuration and mark the device `provisioned`."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO device.configurations (tenant, device_id, config)
                   VALUES ($1, $2, $3)
                   ON CONFLICT (tenant, device_id) DO UPDATE SET config = $3, updated_at = now()""",
                request.tenant, request.device_id, request.config,
            )  # fmt: skip
            await _set_status(
                conn, request.tenant, request.device_id, DeviceStatus.PROVISIONED,
                actor=request.actor, onboarding_id=request.onboarding_id,
                only_from=(DeviceStatus.PENDING,),
            )  # fmt: skip

    @activity.defn(name="device.remove_config")
    async def remove_config(self, request: DeviceTransition) -> None:
        """Compensation of `store_config`."""
        await self.pool.execute(
            """DELETE FROM device.configurations c USING device.devices d
               WHERE c.tenant = $1 AND c.device_id = $2 AND d.tenant = c.tenant
                 AND d.device_id = c.device_id AND d.onboarding_id = $3""",
            request.tenant, request.device_id, request.onboarding_id,
        )  # fmt: skip

    @activity.defn(name="device.activate")
    async def activate(self, request: DeviceTransition) -> None:
        """The device made first contact: it becomes `active`."""
        async with self.pool.acquire() as conn, conn.transaction():
            moved = await _set_status(
                conn, request.tenant, request.device_id, DeviceStatus.ACTIVE,
                actor=request.actor, onboarding_id=request.onboarding_id,
                only_from=(DeviceStatus.PROVISIONED,),
                firmware_version=request.firmware_version,
            )  # fmt: skip
            if not moved:
                status = await conn.fetchval(
                    """SELECT status FROM device.devices
                       WHERE tenant = $1 AND device_id = $2 AND onboarding_id = $3""",
                    request.tenant, request.device_id, request.onboarding_id,
                )  # fmt: skip
                if status != DeviceStatus.ACTIVE:
                    raise _refuse(f"device cannot be activated from {status!r}", "BadTransition")

    @activity.defn(name="device.find_unready")
    async def find_unready(self, ref: WindowRef) -> UnreadyDevices:
        """The devices of a telemetry window that may not send (unknown, or not active)."""
        rows = await self.pool.fetch(
            """SELECT w.tenant, w.device_id, coalesce(d.status, 'unknown') AS reason
               FROM (SELECT DISTINCT tenant, unnest(device_ids) AS device_id
                     FROM data.ingest_batches WHERE window_id = $1) w
               LEFT JOIN device.devices d USING (tenant, device_id)
               WHERE d.status IS DISTINCT FROM 'active'""",
            ref.window_id,
        )
        return UnreadyDevices(devices=[Unready(**dict(r.items())) for r in rows])

    # --- bulk ------------------------------------------------------------------

    @activity.defn(name="device.provision_batch")
    async def provision_batch(self, chunk: BulkChunk) -> BulkChunkResult:
        """Register, credential, configure and activate one slice of a bulk import.

        Each device is all-or-nothing (its own savepoint): a device that fails leaves
        nothing behind, and the others go on. A retry finds its own earlier work.
        """
        rows = await self.pool.fetchval(
            """SELECT jsonb_agg(e ORDER BY i) FROM fleetflow.claim_checks c,
                   jsonb_array_elements(c.body) WITH ORDINALITY AS t(e, i)
               WHERE c.claim_id = $1 AND c.tenant = $2 AND i > $3 AND i <= $3 + $4""",
            chunk.claim_id, chunk.tenant, chunk.offset, chunk.limit,
        )  # fmt: skip
        if rows is None:
            raise _refuse(f"claim {chunk.claim_id} not found", "ClaimMissing")
        types = {t.name: t for t in await self.device_types()}
        ok: list[str] = []
        failed: list[DeviceFailure] = []
        async with self.pool.acquire() as conn, conn.transaction():
            for i, raw in enumerate(rows):
                index = chunk.offset + i
                spec = DeviceSpec.model_validate(raw)
                reason = await self._provision_one(conn, chunk, spec, types)
                if reason is None:
                    ok.append(spec.device_id)
                else:
                    failed.append(DeviceFailure(index=index, device_id=spec.device_id, reason=reason))
        return BulkChunkResult(onboarded=ok, failed=failed)

    async def _provision_one(
        self, conn: Conn, chunk: BulkChunk, spec: DeviceSpec, types: dict[str, DeviceTypeView]
    ) -> str | None:
        kind = types.get(spec.device_type)
        if kind is None:
            return f"unknown device type {spec.device_type!r}"
        try:
            config = config_schema.resolve(spec.config, kind.default_config, kind.config_schema)
        except config_schema.ConfigError as exc:
            return str(exc)
        current = await conn.fetchrow(
            "SELECT status, onboarding_id FROM device.devices WHERE tenant = $1 AND device_id = $2",
            chunk.tenant, spec.device_id,
        )  # fmt: skip
        if current is not None and current["onboarding_id"] == chunk.bulk_id:
            return None  # done by an earlier attempt of this batch
        if current is not None and current["status"] not in _REUSABLE:
            return f"already registered ({current['status']})"
        jti = f"{chunk.bulk_id}:{spec.device_id}"
        token = issue_device_credential(
            self.secret, tenant=chunk.tenant, device_id=spec.device_id, jti=jti,
            issued_at=chunk.issued_at, expires_at=chunk.expires_at, issuer=self.issuer,
        )  # fmt: skip
        async with conn.transaction():
            await conn.execute(
                """INSERT INTO device.devices (tenant, device_id, device_type, firmware_version, tags,
                       metadata, status, onboarding_id)
                   VALUES ($1, $2, $3, $4, $5, $6, 'active', $7)
                   ON CONFLICT (tenant, device_id) DO UPDATE SET device_type = $3,
                       firmware_version = $4, tags = $5, metadata = $6, status = 'active',
                       status_reason = NULL, onboarding_id = $7, updated_at = now()""",
                chunk.tenant, spec.device_id, spec.device_type, spec.firmware_version,
                spec.tags, spec.metadata, chunk.bulk_id,
            )  # fmt: skip
            await conn.execute(
                """INSERT INTO device.status_changes (tenant, device_id, from_status, to_status,
                       reason, actor) VALUES ($1, $2, $3, 'active', 'bulk onboarding', $4)""",
                chunk.tenant, spec.device_id, current["status"] if current else None, chunk.actor,
            )  # fmt: skip
            await conn.execute(
                """INSERT INTO device.credentials (jti, tenant, device_id, token_hash, issued_at,
                       expires_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (jti) DO NOTHING""",
                jti, chunk.tenant, spec.device_id, token_hash(token), chunk.issued_at,
                chunk.expires_at,
            )  # fmt: skip
            await conn.execute(
                """INSERT INTO device.configurations (tenant, device_id, config) VALUES ($1, $2, $3)
                   ON CONFLICT (tenant, device_id) DO UPDATE SET config = $3, updated_at = now()""",
                chunk.tenant, spec.device_id, config,
            )  # fmt: skip
        return None

    @activity.defn(name="device.deprovision_batch")
    async def deprovision_batch(self, batch: DeviceBatch) -> None:
        """Compensation of `provision_batch` for the given devices of this bulk import."""
        async with self.pool.acquire() as conn, conn.transaction():
            device_ids: list[str] = batch.device_ids or [
                r["device_id"]
                for r in await conn.fetch(
                    """SELECT device_id FROM device.devices
                       WHERE tenant = $1 AND onboarding_id = $2 AND status <> 'failed'""",
                    batch.tenant,
                    batch.bulk_id,
                )
            ]
            await conn.execute(
                """UPDATE device.credentials SET revoked_at = now()
                   WHERE tenant = $1 AND device_id = ANY($2) AND jti LIKE $3 || ':%'
                     AND revoked_at IS NULL""",
                batch.tenant, device_ids, batch.bulk_id,
            )  # fmt: skip
            await conn.execute(
                """DELETE FROM device.configurations c USING device.devices d
                   WHERE c.tenant = $1 AND c.device_id = ANY($2) AND d.tenant = c.tenant
                     AND d.device_id = c.device_id AND d.onboarding_id = $3""",
                batch.tenant, device_ids, batch.bulk_id,
            )  # fmt: skip
            for device_id in device_ids:
                await _set_status(
                    conn, batch.tenant, device_id, DeviceStatus.FAILED, actor=batch.actor,
                    reason=batch.reason, onboarding_id=batch.bulk_id,
                )  # fmt: skip

    async def bulk_credentials(self, tenant: str, bulk_id: str) -> list[tuple[str, str]]:
        """(device id, credential) of every live device of a bulk import, re-signed from its claims."""
        rows = await self.pool.fetch(
            """SELECT c.device_id, c.jti, c.issued_at, c.expires_at FROM device.credentials c
               JOIN device.devices d USING (tenant, device_id)
               WHERE c.tenant = $1 AND d.onboarding_id = $2 AND c.jti LIKE $2 || ':%'
                 AND c.revoked_at IS NULL ORDER BY c.device_id""",
            tenant, bulk_id,
        )  # fmt: skip
        return [
            (
                r["device_id"],
                self._resign(tenant, r["device_id"], r["jti"], r["issued_at"], r["expires_at"]),
            )
            for r in rows
        ]

    def _resign(self, tenant: str, device_id: str, jti: str, issued: datetime, expires: datetime) -> str:
        return issue_device_credential(
            self.secret, tenant=tenant, device_id=device_id, jti=jti, issued_at=issued,
            expires_at=expires, issuer=self.issuer,
        )  # fmt: skip
