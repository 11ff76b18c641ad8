"""Revoked API tokens: refused on every request, whichever route verifies the token.

`fleetflow token revoke` adds the token's `(tenant, jti)` to `fleetflow.revoked_tokens`; a
trigger NOTIFYs every API process (migration 0070). Each process keeps "not revoked" answers
for a few seconds, exactly like device credential checks (api/credentials.py: dropped at once
by the NOTIFY, not kept while the listener is down).

`RevokedTokens`, an ASGI middleware, checks the API token of every request (the bearer token,
or the codec session cookie) once its signature verifies, and answers 401 when it is revoked:
the routes verify tokens in several places (auth dependencies, telemetry, codec), and none of
them can forget the check.
"""

from __future__ import annotations

import json
from datetime import datetime

import asyncpg
from starlette.requests import cookie_parser

from api.credentials import CredentialCache
from api.limits import ASGIApp, Receive, Scope, Send
from api.problems import PROBLEM_JSON, problem_body
from fleetflow.db import Pool
from fleetflow.keys import KeyRing, keyring
from fleetflow.pg_listener import PgListener
from fleetflow.security import AuthError, TokenClaims, verify_token
from fleetflow.settings import Settings

CHANNEL = "api_tokens_revoked"
CODEC_COOKIE = "fleetflow_codec"  # api/routers/codec.py's session cookie


# the scope key under which RevokedTokens leaves the claims of the API tokens it verified (and
# found not revoked), so a route verifying the same token again does not pay a second signature
VERIFIED_TOKENS = "fleetflow.verified_tokens"


def verified_token(scope: Scope, ring: KeyRing, token: str, issuer: str) -> TokenClaims:
    """verify_token(ring, token, issuer), answered from the request's scope when RevokedTokens
    verified this token (with the process's key ring and issuer) for this request already."""
    claims: TokenClaims | None = scope.get(VERIFIED_TOKENS, {}).get(token)
    return claims if claims is not None else verify_token(ring, token, issuer)


def revocation_key(tenant: str, jti: str) -> str:
    """The cache key and NOTIFY payload of a token: its tenant and jti."""
    return f"{tenant}/{jti}"


async def revoke(pool: Pool, tenant: str, jti: str, expires: datetime | None, reason: str | None) -> None:
    """Record the token as revoked (every API process refuses it from the next request on, see
    the NOTIFY trigger), and drop the rows of tokens that expired a day ago: they refuse nothing
    any more."""
    await pool.execute(
        """INSERT INTO fleetflow.revoked_tokens (tenant, jti, expires_at, reason)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (tenant, jti)
           DO UPDATE SET reason = coalesce(EXCLUDED.reason, revoked_tokens.reason)""",
        tenant,
        jti,
        expires,
        reason,
    )
    await pool.execute("DELETE FROM fleetflow.revoked_tokens WHERE expires_at < now() - interval '1 day'")


class TokenRevocations:
    """Whether an API token is revoked, cached briefly per (tenant, jti)."""

    def __init__(self, pool: Pool, listener: PgListener | str) -> None:
        self.pool = pool
        self.cache = CredentialCache(listener, self._not_revoked, channel=CHANNEL)

    async def start(self) -> None:
        """Listen for revocations."""
        await self.cache.start()

    async def stop(self) -> None:
        """Stop listening."""
        await self.cache.stop()

    async def _not_revoked(self, tenant: str, _subject: str, key: str, _token: str) -> bool:
        jti = key.partition("/")[2]
        revoked = await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM fleetflow.revoked_tokens WHERE tenant = $1 AND jti = $2)",
            tenant,
            jti,
        )
        return not revoked

    async def revoked(self, claims: TokenClaims, token: str) -> bool:
        """True when the (verified) token has been revoked."""
        key = revocation_key(claims.tenant, claims.jti)
        return not await self.cache.active(claims.tenant, claims.subject, key, token)


def _tokens(scope: Scope) -> list[str]:
    """The request's bearer token and codec session cookie, when present: from the first
    Authorization and the first Cookie header, the ones the routes read (Starlette's
    `headers.get`). Each token costs a signature check: a request repeating a header a
    thousand times must not cost a thousand."""
    found = []
    seen: set[bytes] = set()
    for name, value in scope.get("headers", ()):
        if name not in (b"authorization", b"cookie") or name in seen:
            continue
        seen.add(name)
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                found.append(token.strip())
        else:
            # the parser the codec route reads its cookie with (Starlette's): the stricter
            # SimpleCookie stops at the first odd pair (`x=1;;`, `[x]=1`), and a revoked token
            # after one passed here unseen while the route still read it
            cookie = cookie_parser(value.decode("latin-1")).get(CODEC_COOKIE)
            if cookie:
                found.append(cookie)
    return found


async def _refuse(scope: Scope, send: Send, code: int, detail: str, header: tuple[bytes, bytes]) -> None:
    body = json.dumps(problem_body(code, detail, scope["path"])).encode()
    headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode()), header]
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RevokedTokens:
    """ASGI middleware: 401 for a request carrying a revoked API token."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a revoked token, or serve the request."""
        if scope["type"] == "http":
            app_state = scope["app"].state if "app" in scope else None
            revocations: TokenRevocations | None = getattr(app_state, "revocations", None)
            fleet = getattr(app_state, "fleetflow", None)  # AppState, once the lifespan started
            settings: Settings | None = getattr(fleet, "settings", None)
            if revocations is not None and settings is not None:
                for token in _tokens(scope):
                    try:
                        claims = verify_token(keyring(settings), token, settings.jwt_issuer)
                    except AuthError:
                        continue  # not a valid API token: the route refuses it (or it is a device's)
                    try:
                        revoked = await revocations.revoked(claims, token)
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                        # not knowing is not "not revoked"
                        detail = "cannot check whether the token is revoked; try again"
                        await _refuse(scope, send, 503, detail, (b"retry-after", b"1"))
                        return
                    if revoked:
                        await _refuse(scope, send, 401, "token revoked", (b"www-authenticate", b"Bearer"))
                        return
                    scope.setdefault(VERIFIED_TOKENS, {})[token] = claims
        await self.app(scope, receive, send)
