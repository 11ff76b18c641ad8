"""JWTs, ES256 with a kid from the key ring: API tokens, device credentials, service tokens.

API tokens carry `tenant`, `scopes` and a `jti` (their id, by which they are revoked:
`fleetflow token revoke`); device credentials carry the device id and
their own `jti`, and are stored by the device service only as a hash; service tokens
carry a process's identity and the actor it works for through Temporal headers.
Anything but ES256 from a known, unretired key is refused (`none`, HS256 with the
public key as secret, a forged kid).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from jwt.types import Options
from pydantic import BaseModel, ConfigDict

from fleetflow.contracts.common import TENANT_PATTERN
from fleetflow.keys import ALGORITHM, KeyRing

API_AUDIENCE = "fleetflow-api"
DEVICE_AUDIENCE = "fleetflow-device"
SERVICE_AUDIENCE = "fleetflow-service"
SERVICE_TOKEN_TTL = timedelta(minutes=5)

SCOPES: dict[str, str] = {
    "devices:read": "read devices, onboardings and their progress",
    "devices:write": "onboard, import and cancel devices",
    "devices:approve": "approve or reject onboardings that need approval",
    "system:read": "run the system check, read the tenant's limits (/v1/quotas)",
    "telemetry:write": "send telemetry for any device of the tenant",
    "telemetry:read": "read telemetry, quarantine counts and alerts",
    "rules:write": "create and change analytics rules",
    "alerts:write": "acknowledge and clear alerts by hand",
    "events:read": "list domain events and dead letters",
    "rollouts:admin": "upload firmware, run, pause, resume and cancel rollouts, decommission devices",
    "devices:command": "send commands to devices and read their results",
    "subscriptions:write": "manage webhook subscriptions and redeliver dead letters",
    # every tenant's payloads: for platform operators, so a tenant's admin does not include it
    "codec:decode": "decode any workflow's payloads through /codec (the Web UI's codec server)",
    # every tenant's limits: for platform operators, so a tenant's admin does not include it
    "tenants:admin": "set any tenant's profile (its rate limits and quotas)",
    # every tenant's findings and a fleet-wide run: for platform operators (admin does not include it)
    "consistency:admin": "read every tenant's consistency findings, run a reconciliation (/v1/consistency)",
    # for the MQTT broker of the compose stack: its device login and topic checks (/v1/mqtt/*);
    # every tenant's devices, so a tenant's admin does not include it
    "mqtt:hooks": "ask whether an MQTT device login or topic is allowed (broker hooks)",
    # every tenant's device traffic: for `fleetflow mqtt-bridge` (admin does not include it)
    "mqtt:bridge": "log in to the MQTT broker as a fleetflow bridge (shared subscriptions, pushes)",
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
    jti: str


class DeviceClaims(BaseModel):
    """The verified claims of a device credential."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    tenant: str
    jti: str


class ServiceActor(BaseModel):
    """On whose behalf a service acts: a user's token subject, or the service itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: str
    tenant: str | None = None
    scopes: tuple[str, ...] = ()


class ServiceCall(BaseModel):
    """The one Temporal call a service token is good for: an operation (`start:<type>`,
    `signal:<name>`, `update:<name>`, `query:<name>`, `activity:<type>`) on one workflow id,
    and, where the signer knows them, one run and one update id. A header copied out of a
    history is then worthless for any other workflow, run, operation or update."""

    model_config = ConfigDict(frozen=True)

    workflow_id: str
    ops: tuple[str, ...]
    run_id: str | None = None
    update_id: str | None = None


class ServiceIdentity(BaseModel):
    """The verified identity a Temporal call carried in its headers."""

    model_config = ConfigDict(frozen=True)

    service: str
    actor: ServiceActor


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(ring: KeyRing, claims: dict[str, Any], kid: str | None = None) -> str:
    """A compact JWS, ES256, with the signing key's kid (or the given one) in its header."""
    key = ring.get(kid) if kid else ring.signing_key()
    if key is None:
        raise AuthError(f"signing key {kid!r} is unknown or retired")
    header = {"alg": ALGORITHM, "kid": key.kid, "typ": "JWT"}
    signing_input = ".".join(
        _b64(json.dumps(part, separators=(",", ":"), sort_keys=True).encode()) for part in (header, claims)
    )
    return f"{signing_input}.{_b64(key.sign(signing_input.encode()))}"


def issue_token(
    ring: KeyRing,
    *,
    subject: str,
    tenant: str,
    scopes: list[str],
    ttl: timedelta,
    issuer: str = "fleetflow",
    now: datetime | None = None,
    jti: str | None = None,
) -> str:
    """Sign an API token, with its own `jti` (a new random one unless given)."""
    if re.fullmatch(TENANT_PATTERN, tenant) is None:
        raise ValueError(f"tenant {tenant!r} must match {TENANT_PATTERN}")
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
        "jti": jti or uuid.uuid4().hex,
    }
    return _sign(ring, claims)


def kid_of(token: str) -> str | None:
    """The kid in a token's header, unverified (None when absent or malformed)."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        return None
    return kid if isinstance(kid, str) else None


def _decode(
    ring: KeyRing,
    token: str,
    audience: str,
    issuer: str,
    *,
    at: datetime | None = None,
    grace: timedelta = timedelta(0),
) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise AuthError("token is malformed") from None
    if header.get("alg") != ALGORITHM:
        # `none`, and HS256 "signed" with our public key, end here
        raise AuthError(f"token algorithm {str(header.get('alg'))[:16]!r} is not accepted")
    kid = header.get("kid")
    # `at` (a moment the Temporal server recorded: a workflow's start, an activity's schedule):
    # the key must not have been retired before it, and expiry is checked against it below
    # instead of now, so a replay or a retry reaches the verdict the first check reached
    key = ring.get(kid, active_at=at) if isinstance(kid, str) else None
    if key is None:
        raise AuthError("token is signed by an unknown or retired key")
    options: Options = {
        "require": ["exp", "iss", "aud", "sub"],
        "verify_exp": at is None,
        "verify_iat": at is None,
    }
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key.public_key, algorithms=[ALGORITHM], audience=audience, issuer=issuer, options=options
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
    if at is not None and not (isinstance(claims["exp"], int) and (at - grace).timestamp() < claims["exp"]):
        raise AuthError("token expired")
    return claims


def verify_token(ring: KeyRing, token: str, issuer: str = "fleetflow") -> TokenClaims:
    """Verify an API token's signature, key, expiry, issuer and audience (whether its `jti` is
    revoked is the API's to check: api/revocations.py)."""
    claims = _decode(ring, token, API_AUDIENCE, issuer)
    tenant, scopes, jti = claims.get("tenant"), claims.get("scopes"), claims.get("jti")
    if not isinstance(tenant, str) or not isinstance(scopes, list):
        raise AuthError("token lacks tenant or scopes")
    if not isinstance(jti, str) or not jti:
        # a token without an id could not be revoked
        raise AuthError("token lacks the 'jti' claim")
    if re.fullmatch(TENANT_PATTERN, tenant) is None:
        raise AuthError("token's tenant is not a valid tenant id")
    return TokenClaims(
        subject=str(claims["sub"]),
        tenant=tenant,
        scopes=tuple(str(s) for s in scopes),
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        jti=jti,
    )


def issue_device_credential(
    ring: KeyRing,
    *,
    tenant: str,
    device_id: str,
    jti: str,
    issued_at: datetime,
    expires_at: datetime,
    issuer: str = "fleetflow",
    kid: str | None = None,
) -> str:
    """Sign a device credential; the same inputs and key give the same token, so issuing is
    idempotent (kid: the key that signed it first, when re-issuing)."""
    claims = {
        "iss": issuer,
        "aud": DEVICE_AUDIENCE,
        "sub": device_id,
        "tenant": tenant,
        "jti": jti,
        "iat": int(issued_at.timestamp()),
        "exp": int(expires_at.timestamp()),
    }
    return _sign(ring, claims, kid)


def verify_device_credential(ring: KeyRing, token: str, issuer: str = "fleetflow") -> DeviceClaims:
    """Verify a device credential's signature and expiry (revocation is the device service's)."""
    claims = _decode(ring, token, DEVICE_AUDIENCE, issuer)
    if not isinstance(claims.get("jti"), str) or not isinstance(claims.get("tenant"), str):
        raise AuthError("credential lacks jti or tenant")
    if re.fullmatch(TENANT_PATTERN, claims["tenant"]) is None:
        raise AuthError("credential's tenant is not a valid tenant id")
    return DeviceClaims(device_id=str(claims["sub"]), tenant=claims["tenant"], jti=claims["jti"])


def issue_service_token(
    ring: KeyRing,
    *,
    service: str,
    actor: ServiceActor,
    call: ServiceCall | None = None,
    ttl: timedelta = SERVICE_TOKEN_TTL,
    issuer: str = "fleetflow",
    now: datetime | None = None,
) -> str:
    """Sign the short-lived identity a caller puts in Temporal headers, for `call`."""
    issued = now or datetime.now(UTC)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": SERVICE_AUDIENCE,
        "sub": service,
        "actor": actor.model_dump(),
        "iat": int(issued.timestamp()),
        "exp": int((issued + ttl).timestamp()),
    }
    if call is not None:
        claims["call"] = call.model_dump(exclude_none=True)
    return _sign(ring, claims)


def verify_service_token(
    ring: KeyRing,
    token: str,
    issuer: str = "fleetflow",
    *,
    at: datetime | None = None,
    grace: timedelta = timedelta(0),
    call: ServiceCall | None = None,
) -> ServiceIdentity:
    """Verify a service token, valid at `at` (now when None; `grace`: how long after its
    expiry it is still taken, for a message that waited for a worker), and made for `call`
    (its workflow id, one of its operations, and its run and update id where the token names
    them)."""
    claims = _decode(ring, token, SERVICE_AUDIENCE, issuer, at=at, grace=grace)
    try:
        actor = ServiceActor.model_validate(claims.get("actor"))
    except ValueError:
        raise AuthError("service token lacks a valid actor") from None
    if call is not None:
        _check_call(claims, call, at)
    return ServiceIdentity(service=str(claims["sub"]), actor=actor)


def _check_call(claims: dict[str, Any], call: ServiceCall, at: datetime | None) -> None:
    if "call" not in claims:
        # signed by the release before calls were bound: taken until it expires, without
        # grace, so it only serves a rolling upgrade and the retries and replays of runs
        # already in flight (their `at` is when the server first took them)
        if at is not None and at.timestamp() >= claims["exp"]:
            raise AuthError("token expired")
        return
    try:
        bound = ServiceCall.model_validate(claims["call"])
    except ValueError:
        raise AuthError("service token names no valid call") from None
    if bound.workflow_id != call.workflow_id:
        raise AuthError(f"service token was made for another workflow, not {call.workflow_id!r}")
    if not set(call.ops) & set(bound.ops):
        raise AuthError(f"service token was made for {', '.join(bound.ops)}, not {', '.join(call.ops)}")
    if bound.run_id is not None and bound.run_id != call.run_id:
        raise AuthError("service token was made for another run")
    if bound.update_id is not None and bound.update_id != call.update_id:
        raise AuthError("service token was made for another update")


def token_hash(token: str) -> str:
    """The only form in which a credential is stored."""
    return hashlib.sha256(token.encode()).hexdigest()
