"""The device service's read model: what the API reads directly (never writes)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fleetflow import config_schema
from fleetflow.contracts.devices import DeviceSpec, DeviceTypeView, DeviceView, ValidatedOnboarding
from fleetflow.db import Pool
from fleetflow.security import token_hash


class DeviceReadModel:
    """Reads of the `device` schema (and device types, which admins edit through the API)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    # a tenant's own device type of a name hides the platform's built-in one ('' tenant)
    async def device_type(self, tenant: str, name: str) -> DeviceTypeView | None:
        """The tenant's device type of that name (its own, else the built-in one), or None."""
        row = await self.pool.fetchrow(
            """SELECT name, config_schema, default_config, requires_approval, credential_lifetime_days,
                   credential_overlap_s FROM device.device_types
               WHERE name = $2 AND tenant IN ('', $1) ORDER BY tenant DESC LIMIT 1""",
            tenant,
            name,
        )
        return None if row is None else DeviceTypeView.model_validate(dict(row.items()))

    async def device_types(self, tenant: str) -> list[DeviceTypeView]:
        """Every device type the tenant sees: its own and the built-in ones it has not replaced."""
        rows = await self.pool.fetch(
            """SELECT DISTINCT ON (name) name, config_schema, default_config, requires_approval,
                   credential_lifetime_days, credential_overlap_s
               FROM device.device_types WHERE tenant IN ('', $1) ORDER BY name, tenant DESC""",
            tenant,
        )
        return [DeviceTypeView.model_validate(dict(r.items())) for r in rows]

    async def put_device_type(self, tenant: str, view: DeviceTypeView) -> None:
        """Create or replace the tenant's own device type (never another tenant's)."""
        await self.pool.execute(
            """INSERT INTO device.device_types (tenant, name, config_schema, default_config,
                   requires_approval, credential_lifetime_days, credential_overlap_s)
               VALUES ($1, $2, $3, $4, $5, $6, $7)
               ON CONFLICT (tenant, name) DO UPDATE SET config_schema = $3, default_config = $4,
                   requires_approval = $5, credential_lifetime_days = $6, credential_overlap_s = $7""",
            tenant,
            view.name,
            view.config_schema,
            view.default_config,
            view.requires_approval,
            view.credential_lifetime_days,
            view.credential_overlap_s,
        )

    async def resolve_config(self, tenant: str, spec: DeviceSpec) -> ValidatedOnboarding:
        """The configuration spec gets (type defaults merged) or ConfigError / LookupError."""
        kind = await self.device_type(tenant, spec.device_type)
        if kind is None:
            raise LookupError(f"unknown device type {spec.device_type!r}")
        config = config_schema.resolve(spec.config, kind.default_config, kind.config_schema)
        return ValidatedOnboarding(
            config=config,
            requires_approval=kind.requires_approval,
            config_schema=kind.config_schema,
            credential_lifetime_days=kind.credential_lifetime_days,
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
            tenant,
            status,
            device_type,
            tag,
            after,
            limit,
        )
        return [DeviceView.model_validate(dict(r.items())) for r in rows]

    async def credential_active(self, tenant: str, device_id: str, jti: str, token: str) -> bool:
        """True when the credential exists for that device, matches its hash and is not revoked,
        expired or past the overlap of its renewal."""
        return await self.credential_valid_until(tenant, device_id, jti, token) is not None

    async def credential_valid_until(
        self, tenant: str, device_id: str, jti: str, token: str
    ) -> datetime | None:
        """Until when the credential is good (expiry, or the end of its renewal's overlap);
        None when it is unknown, revoked, expired or replaced for good."""
        value: datetime | None = await self.pool.fetchval(
            """SELECT LEAST(expires_at, COALESCE(valid_until, expires_at)) FROM device.credentials
               WHERE jti = $1 AND tenant = $2 AND device_id = $3 AND token_hash = $4
                 AND revoked_at IS NULL AND expires_at > now()
                 AND (valid_until IS NULL OR valid_until > now())""",
            jti,
            tenant,
            device_id,
            token_hash(token),
        )
        return value

    async def credentials_active(self, held: Sequence[tuple[str, str, str, str]]) -> list[bool]:
        """`credential_active` of many (tenant, device id, jti, credential) in one query, in order."""
        if not held:
            return []
        rows = await self.pool.fetch(
            """SELECT u.i FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                   WITH ORDINALITY AS u(tenant, device_id, jti, token_hash, i)
               JOIN device.credentials c ON c.jti = u.jti AND c.tenant = u.tenant
                   AND c.device_id = u.device_id AND c.token_hash = u.token_hash
               WHERE c.revoked_at IS NULL AND c.expires_at > now()""",
            [h[0] for h in held],
            [h[1] for h in held],
            [h[2] for h in held],
            [token_hash(h[3]) for h in held],
        )
        active = {int(r["i"]) - 1 for r in rows}
        return [i in active for i in range(len(held))]

    async def config_of(self, tenant: str, device_id: str) -> dict[str, Any] | None:
        """The stored configuration of a device, or None."""
        value = await self.pool.fetchval(
            "SELECT config FROM device.configurations WHERE tenant = $1 AND device_id = $2",
            tenant,
            device_id,
        )
        return None if value is None else dict(value)
