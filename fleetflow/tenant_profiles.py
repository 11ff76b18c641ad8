"""Tenant profiles in PostgreSQL (fleetflow.tenant_profiles): read by the API's limits, written
by `PUT /v1/tenants/{tenant}/profile` and `fleetflow tenants profile`."""

from __future__ import annotations

import json
from typing import Any

from fleetflow.contracts.tenants import TenantProfile
from fleetflow.db import Pool

# NOTIFYed (payload: the tenant) by a trigger on every change of a profile (migration 0350)
PROFILE_CHANGED_CHANNEL = "tenant_profile_changed"


async def read_profile(pool: Pool | Any, tenant: str) -> TenantProfile:
    """The tenant's stored overrides (empty when it has none); pool may be a connection."""
    stored = await pool.fetchval("SELECT profile FROM fleetflow.tenant_profiles WHERE tenant = $1", tenant)
    # the platform's pool decodes jsonb (fleetflow.db); a bare connection gives text
    return TenantProfile.model_validate(json.loads(stored) if isinstance(stored, str) else stored or {})


async def write_profile(pool: Pool, tenant: str, profile: TenantProfile, by: str) -> None:
    """Replace the tenant's overrides (an empty profile: the platform defaults)."""
    await pool.execute(
        """INSERT INTO fleetflow.tenant_profiles (tenant, profile, updated_by) VALUES ($1, $2, $3)
           ON CONFLICT (tenant) DO UPDATE SET profile = $2, updated_by = $3, updated_at = now()""",
        tenant,
        profile.model_dump(exclude_none=True),
        by,
    )


async def retention_overrides(pool: Pool | Any) -> dict[str, tuple[int | None, int | None]]:
    """tenant -> (raw_retention_days, rollup_retention_days) of every profile that sets either."""
    rows = await pool.fetch(
        """SELECT tenant, (profile->>'raw_retention_days')::int AS raw,
                  (profile->>'rollup_retention_days')::int AS rollup
           FROM fleetflow.tenant_profiles
           WHERE profile ? 'raw_retention_days' OR profile ? 'rollup_retention_days'"""
    )
    return {r["tenant"]: (r["raw"], r["rollup"]) for r in rows}
