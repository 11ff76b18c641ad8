"""Tenant profiles: the limits in force for the caller's tenant, and (for platform operators
holding `tenants:admin`, which a tenant's `admin` does not include) any tenant's profile."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, status

from api.auth import Bearer, State, api_claims, require, token_of
from api.models.tenants import TenantProfileView
from fleetflow.contracts.limits import TENANT_PATTERN
from fleetflow.contracts.tenants import TenantProfile
from fleetflow.security import TokenClaims

router = APIRouter(tags=["tenants"])
SCOPE = "tenants:admin"
TenantPath = Annotated[str, Path(pattern=TENANT_PATTERN)]


async def _operator(state: State, credentials: Bearer) -> TokenClaims:
    """A token holding tenants:admin itself (a tenant's own admin may not raise its limits)."""
    claims = api_claims(state, token_of(credentials))
    if SCOPE not in claims.scopes:
        detail = f"this needs the {SCOPE!r} scope itself (admin does not include it)"
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=detail)
    return claims


Caller = Annotated[TokenClaims, Depends(require("system:read"))]
Operator = Annotated[TokenClaims, Depends(_operator)]


async def _view(state: State, tenant: str) -> TenantProfileView:
    return TenantProfileView(
        tenant=tenant, profile=await state.quotas.profile(tenant), limits=await state.quotas.limits(tenant)
    )


@router.get("/v1/quotas", response_model=TenantProfileView)
async def my_quotas(state: State, claims: Caller) -> TenantProfileView:
    """The caller's tenant: its profile and the limits in force (0: unlimited)."""
    return await _view(state, claims.tenant)


@router.get("/v1/tenants/{tenant}/profile", response_model=TenantProfileView)
async def get_profile(tenant: TenantPath, state: State, claims: Operator) -> TenantProfileView:
    """A tenant's profile and the limits in force (tenants:admin)."""
    return await _view(state, tenant)


@router.put("/v1/tenants/{tenant}/profile", response_model=TenantProfileView)
async def put_profile(
    tenant: TenantPath, body: TenantProfile, state: State, claims: Operator
) -> TenantProfileView:
    """Replace a tenant's profile (tenants:admin): the fields given override the platform
    defaults, the ones left out follow them; `{}` resets. Every API and MQTT process applies it
    at once (a PostgreSQL notification)."""
    await state.quotas.set_profile(tenant, body, claims.subject)
    return await _view(state, tenant)
