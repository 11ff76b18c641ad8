"""JWTs: operator/API tokens and per-device credentials (pyjwt).

API tokens carry `tenant` and `scopes`; device credentials carry the device id and
their own `jti`, and are stored by the device service only as a hash.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from pydantic import BaseModel, ConfigDict

API_AUDIENCE = "fleetflow-api"
DEVICE_AUDIENCE = "fleetflow-device"
ALGORITHM = "HS256"

SCOPES: dict[str, str] = {
    "devices:read": "read devices, onboardings and their progress",
    "devices:write": "onboard, import and cancel devices",
    "devices:approve": "approve or reject onboardings that need approval",
    "system:read": "run the system check",
    "telemetry:write": "send telemetry for any device of the tenant",
    "telemetry:read": "read telemetry, quarantine counts and alerts",
    "rules:write": "create and change analytics rules",
    "events:read": "list domain events and dead letters",
    "rollouts:admin": "upload firmware, run, pause, resume and cancel rollouts, decommission devices",
    "subscriptions:write": "manage webhook subscriptions and redeliver dead letters",
    "admin": "everything, including device types",
}


class AuthError(Exception):
    """A token that is refused; the message says why, never the token."""


class TokenClaims(BaseModel):
    """The verified claims of an API token."""

    model_config = ConfigDict(frozen=True)

    subject: str
    tenant: str
    scopes: tuple[str, ...]
    expires_at: datetime


class DeviceClaims(BaseModel):
    """The verified claims of a device credential."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    tenant: str
    jti: str


def issue_token(
    secret: str,
    *,
    subject: str,
    tenant: str,
    scopes: list[str],
    ttl: timedelta,
    issuer: str = "fleetflow",
    now: datetime | None = None,
) -> str:
    """Sign an API token."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s): {', '.join(unknown)}")
    issued = now or datetime.now(UTC)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": API_AUDIENCE,
        "sub": subject,
        "tenant": tenant,
        "scopes": sorted(set(scopes)),
        "iat": int(issued.timestamp()),
        "exp": int((issued + ttl).timestamp()),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _decode(secret: str, token: str, audience: str, issuer: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidAudienceError:
        raise AuthError("token has the wrong audience") from None
    except jwt.InvalidIssuerError:
        raise AuthError("token has the wrong issuer") from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature is invalid") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token lacks the {exc.claim!r} claim") from None
    except jwt.InvalidTokenError:
        raise AuthError("token is malformed") from None
    return claims


def verify_token(secret: str, token: str, issuer: str = "fleetflow") -> TokenClaims:
    """Verify an API token's signature, expiry, issuer and audience."""
    claims = _decode(secret, token, API_AUDIENCE, issuer)
    tenant, scopes = claims.get("tenant"), claims.get("scopes")
    if not isinstance(tenant, str) or not isinstance(scopes, list):
        raise AuthError("token lacks tenant or scopes")
    return TokenClaims(
        subject=str(claims["sub"]),
        tenant=tenant,
        scopes=tuple(str(s) for s in scopes),
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
    )


def issue_device_credential(
    secret: str,
    *,
    tenant: str,
    device_id: str,
    jti: str,
    issued_at: datetime,
    expires_at: datetime,
    issuer: str = "fleetflow",
) -> str:
    """Sign a device credential; the same inputs give the same token, so issuing is idempotent."""
    claims = {
        "iss": issuer,
        "aud": DEVICE_AUDIENCE,
        "sub": device_id,
        "tenant": tenant,
        "jti": jti,
        "iat": int(issued_at.timestamp()),
        "exp": int(expires_at.timestamp()),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_device_credential(secret: str, token: str, issuer: str = "fleetflow") -> DeviceClaims:
    """Verify a device credential's signature and expiry (revocation is the device service's)."""
    claims = _decode(secret, token, DEVICE_AUDIENCE, issuer)
    if not isinstance(claims.get("jti"), str) or not isinstance(claims.get("tenant"), str):
        raise AuthError("credential lacks jti or tenant")
    return DeviceClaims(device_id=str(claims["sub"]), tenant=claims["tenant"], jti=claims["jti"])


def token_hash(token: str) -> str:
    """The only form in which a credential is stored."""
    return hashlib.sha256(token.encode()).hexdigest()
