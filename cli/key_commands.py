"""`fleetflow keys`: list, rotate and retire the platform's signing (and payload) keys;
`fleetflow token revoke`: refuse one API token from now on."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime

import jwt

from api.revocations import revoke
from fleetflow.contracts.common import TENANT_PATTERN
from fleetflow.db import create_pool
from fleetflow.embedded_pg import database_url
from fleetflow.errors import StartupError
from fleetflow.keys import KeySetError, keyring
from fleetflow.payload_codec import payload_keys
from fleetflow.settings import Settings


def keys_command(settings: Settings, args: argparse.Namespace) -> int:
    """Dispatch `fleetflow keys list|rotate|retire`."""
    ring = keyring(settings)
    if args.keys_command == "rotate":
        if args.payload:
            try:
                kid = payload_keys(settings).rotate().kid
            except KeySetError as exc:
                raise StartupError(str(exc)) from None
            print(f"payload key {kid} encrypts from now on; older payload keys keep decrypting")
            return 0
        old = ring.signing_key().kid
        key = ring.rotate()
        print(f"signing key {key.kid} signs from now on")
        print(f"tokens signed by {old} stay valid until `fleetflow keys retire {old}`")
        return 0
    if args.keys_command == "retire":
        try:
            key = ring.retire(args.kid)
        except KeySetError as exc:
            raise StartupError(str(exc)) from None
        print(f"signing key {key.kid} retired: tokens and device credentials it signed are refused")
        return 0
    signing = ring.signing_key().kid
    print(f"{'KID':<20}{'CREATED':<22}STATUS")
    for key in ring.keys():
        state = "signing" if key.kid == signing else "retired" if key.retired_at else "verifying"
        print(f"{key.kid:<20}{key.created_at:%Y-%m-%d %H:%M:%SZ}  {state}")
    payload = payload_keys(settings)
    source = "FLEETFLOW_PAYLOAD_KEYS" if payload.configured else str(payload.path)
    print(f"\npayload keys (AES-256-GCM, from {source}):")
    payload.current()  # made on first use, like the signing key
    for index, pkey in enumerate(payload.keys()):
        print(f"{pkey.kid:<20}{'encrypting' if index == 0 else 'decrypting'}")
    return 0


def _revocation_of(args: argparse.Namespace) -> tuple[str, str, datetime | None]:
    """(tenant, jti, expiry) of the token or jti given on the command line."""
    given: str = args.token
    if given.count(".") == 2:  # a token: its own claims say what to revoke (even if expired or forged:
        try:  # revoking never grants anything)
            claims = jwt.decode(given, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise StartupError("that is not a token (pass a token, or a jti with --tenant)") from None
        tenant, jti, exp = claims.get("tenant"), claims.get("jti"), claims.get("exp")
        if not isinstance(jti, str) or not isinstance(tenant, str):
            raise StartupError("the token has no jti or tenant: retire its signing key instead")
        if args.tenant and args.tenant != tenant:
            raise StartupError(f"the token is of tenant {tenant!r}, not {args.tenant!r}")
        expires = datetime.fromtimestamp(exp, UTC) if isinstance(exp, int | float) else None
        return tenant, jti, expires
    if not args.tenant:
        raise StartupError("--tenant is needed with a jti")
    return args.tenant, given, None


async def revoke_token_command(settings: Settings, args: argparse.Namespace) -> int:
    """`fleetflow token revoke TOKEN|JTI`: every API process refuses the token from now on."""
    tenant, jti, expires = _revocation_of(args)
    if re.fullmatch(TENANT_PATTERN, tenant) is None:
        raise StartupError(f"tenant {tenant!r} must match {TENANT_PATTERN}")
    pool = await create_pool(database_url(settings), size=1)
    try:
        await revoke(pool, tenant, jti, expires, args.reason)
    finally:
        await pool.close()
    print(f"token {jti} of tenant {tenant} revoked: every API process refuses it from now on")
    return 0
