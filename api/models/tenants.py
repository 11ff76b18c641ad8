"""Answers of `/v1/quotas` and `/v1/tenants/{tenant}/profile` (its body, TenantProfile, is the
stored profile itself and refuses unknown fields on its own)."""

from __future__ import annotations

from api.models.base import View
from fleetflow.contracts.tenants import TenantLimits, TenantProfile


class TenantProfileView(View):
    """A tenant's profile as stored, and the limits in force."""

    tenant: str
    profile: TenantProfile
    limits: TenantLimits
