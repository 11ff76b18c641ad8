"""Bearer-token dependencies: operator tokens with scopes, and device credentials."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.state import AppState, get_state
from fleetflow.contracts.common import Actor
from fleetflow.identity import act_for
from fleetflow.security import (
    AuthError,
    DeviceClaims,
    ServiceActor,
    TokenClaims,
    verify_device_credential,
    verify_token,
)

_bearer = HTTPBearer(auto_error=False, description="an API token (fleetflow token issue)")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
State = Annotated[AppState, Depends(get_state)]


def unauthorized(reason: str) -> HTTPException:
    """401 with the reason, asking for a bearer token."""
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=reason, headers={"WWW-Authenticate": "Bearer"})


def token_of(credentials: HTTPAuthorizationCredentials | None) -> str:
    """The bearer token; 401 when there is none."""
    if credentials is None or not credentials.credentials:
        raise unauthorized("missing bearer token")
    return credentials.credentials


def api_claims(state: AppState, token: str) -> TokenClaims:
    """The verified claims of an API token; 401 with the reason otherwise."""
    try:
        return verify_token(state.keys, token, state.settings.jwt_issuer)
    except AuthError as exc:
        raise unauthorized(str(exc)) from None


def require(scope: str) -> Callable[..., Awaitable[TokenClaims]]:
    """Dependency: a valid API token holding scope (or admin); 401 or 403 otherwise."""

    async def dependency(state: State, credentials: Bearer) -> TokenClaims:
        claims = api_claims(state, token_of(credentials))
        if scope not in claims.scopes and "admin" not in claims.scopes:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"this needs the {scope!r} scope")
        await state.quotas.admit_request(claims.tenant)  # 429 over the tenant's requests/s
        # the workflows this request starts or signals carry the caller, signed (fleetflow.identity)
        act_for(ServiceActor(subject=claims.subject, tenant=claims.tenant, scopes=claims.scopes))
        return claims

    return dependency


def act_for_claims(claims: TokenClaims) -> None:
    """The workflows this request starts or signals carry the caller (fleetflow.identity)."""
    act_for(ServiceActor(subject=claims.subject, tenant=claims.tenant, scopes=claims.scopes))


def actor_of(claims: TokenClaims) -> Actor:
    """The identity that travels into workflows."""
    return Actor(subject=claims.subject, tenant=claims.tenant, scopes=list(claims.scopes))


async def require_device(state: State, credentials: Bearer) -> tuple[DeviceClaims, str]:
    """Dependency: a device credential that is valid and not revoked (checked every request)."""
    token = token_of(credentials)
    try:
        claims = verify_device_credential(state.keys, token, state.settings.jwt_issuer)
    except AuthError as exc:
        raise unauthorized(str(exc)) from None
    if not await state.credentials.active(claims.tenant, claims.device_id, claims.jti, token):
        raise unauthorized("credential revoked or unknown")
    await state.quotas.admit_request(claims.tenant, claims.device_id)  # 429 over a requests/s
    act_for(ServiceActor(subject=f"device:{claims.device_id}", tenant=claims.tenant))
    return claims, token
