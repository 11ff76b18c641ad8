"""Request body limits, enforced on the raw bytes before authentication and parsing.

One table says how large a body each route takes; every other route takes at most
`DEFAULT_MAX_BODY_BYTES`, and so does a request without a validly signed bearer token (the
route would refuse it anyway; this way nobody anonymous makes the API take more than that),
and a device credential outside the routes devices send to.
`BodyLimit`, a pure ASGI middleware, refuses a declared
`Content-Length` over the limit before the application runs (so nothing is read), and counts
the bytes of a body without one (chunked) as they arrive, answering 413 at the first byte
over. Routes keep their own, finer checks (readings per batch, twin document depth and size).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import jwt

from api.problems import PROBLEM_JSON, problem_body
from fleetflow.contracts.limits import MAX_BATCH_BYTES
from fleetflow.contracts.twin import MAX_DOCUMENT_BYTES
from fleetflow.keys import keyring
from fleetflow.security import DEVICE_AUDIENCE, AuthError, verify_device_credential, verify_token

KIB = 1024
MIB = 1024 * KIB

DEFAULT_MAX_BODY_BYTES = 1 * MIB
# a twin document as sent: a desired-state merge patch or a reported document of up to
# MAX_DOCUMENT_BYTES with whitespace around it (the twin route checks the document's own size,
# depth and keys once it is parsed)
TWIN_DOCUMENT_MAX_BYTES = 2 * MAX_DOCUMENT_BYTES
TELEMETRY_MAX_BODY_BYTES = MAX_BATCH_BYTES  # 2 MiB
BULK_MAX_BODY_BYTES = 8 * MIB  # up to 10,000 devices, JSON or CSV
# up to 100,000 device ids of up to 128 characters: 13.5 MB as pretty-printed JSON
ROLLOUT_MAX_BODY_BYTES = 16 * MIB
CODEC_MAX_BODY_BYTES = 8 * MIB  # the Web UI's payloads: Temporal allows 2 MB each, base64 adds a third
FIRMWARE_MAX_BODY_BYTES = 256 * MIB  # a raw image, read only after the token is checked

# path pattern -> the most bytes its body may have; the first match wins
ROUTE_BODY_LIMITS: tuple[tuple[str, int], ...] = (
    (r"/v1/telemetry", TELEMETRY_MAX_BODY_BYTES),
    (r"/v1/devices:bulk", BULK_MAX_BODY_BYTES),
    (r"/v1/devices/[^/]+/twin/desired", TWIN_DOCUMENT_MAX_BYTES),
    (r"/v1/device/twin/reported", TWIN_DOCUMENT_MAX_BYTES),
    (r"/v1/rollouts", ROLLOUT_MAX_BODY_BYTES),
    (r"/codec/(decode|encode)", CODEC_MAX_BODY_BYTES),
    (r"/v1/firmware", FIRMWARE_MAX_BODY_BYTES),
)
_COMPILED = tuple((re.compile(pattern), limit) for pattern, limit in ROUTE_BODY_LIMITS)
# the routes of the table whose JSON body FastAPI parses before their token's scope is
# checked (a body parameter): their larger limit needs that scope (`admin` holds all but
# codec:decode), or a token of any scope could make the API parse 8 MiB, then answer 403
PARSED_BEFORE_SCOPE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"/v1/rollouts"), "rollouts:admin"),
    (re.compile(r"/codec/(decode|encode)"), "codec:decode"),
)
# the routes of the table a device credential may send to; on the others (operator routes,
# whose JSON body FastAPI reads and parses before their token check) it gets the default
DEVICE_BODY_ROUTES = re.compile(r"/v1/telemetry|/v1/device/twin/reported")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def body_limit(path: str) -> int:
    """The most bytes a request body to path may have."""
    for pattern, limit in _COMPILED:
        if pattern.fullmatch(path):
            return limit
    return DEFAULT_MAX_BODY_BYTES


def bearer_of(scope: Scope) -> str | None:
    """The request's bearer token, if it has one."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _signed(scope: Scope) -> bool:
    """True when the bearer token is an API token, or a device credential on a route devices
    send to, that our keys signed and that has not expired, and on a route whose body is
    parsed before its scope check, holds that scope (the rest of the scopes, and revocation,
    are the route's and RevokedTokens')."""
    token = bearer_of(scope)
    settings = (
        getattr(getattr(scope["app"].state, "fleetflow", None), "settings", None) if "app" in scope else None
    )
    if token is None or settings is None:
        return False
    try:  # which kind it claims to be, so only one signature is checked
        audience = jwt.decode(token, options={"verify_signature": False}).get("aud")
    except jwt.InvalidTokenError:
        return False
    path = scope["path"]
    if audience == DEVICE_AUDIENCE and not DEVICE_BODY_ROUTES.fullmatch(path):
        return False
    try:
        if audience == DEVICE_AUDIENCE:
            verify_device_credential(keyring(settings), token, settings.jwt_issuer)
            return True
        claims = verify_token(keyring(settings), token, settings.jwt_issuer)
    except AuthError:
        return False
    return all(
        _holds(claims.scopes, needed) for pattern, needed in PARSED_BEFORE_SCOPE if pattern.fullmatch(path)
    )


def _holds(scopes: tuple[str, ...], scope: str) -> bool:
    return scope in scopes or ("admin" in scopes and scope != "codec:decode")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed one before we see it
    return None


async def _too_large(scope: Scope, send: Send, limit: int) -> None:
    detail = f"the body of {scope.get('method', 'a request')} {scope['path']} may have at most {limit} bytes"
    body = problem_body(413, detail, scope["path"])
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(payload)).encode()),
                # the rest of the body is not wanted: the server closes instead of reading it
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """ASGI middleware: 413 for a body over its route's limit, before the application reads it."""

    def __init__(self, app: ASGIApp, limit_of: Callable[[str], int] = body_limit) -> None:
        self.app = app
        self.limit_of = limit_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request, or refuse its body."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_of(scope["path"])
        declared = _content_length(scope)
        small = declared is not None and declared <= DEFAULT_MAX_BODY_BYTES  # no need to look
        # a small declared length skips the token check, and the count then keeps to the
        # default too: a server may frame the body by its chunks and not by that length
        # (h11 takes `Content-Length` with `Transfer-Encoding: chunked`)
        if limit > DEFAULT_MAX_BODY_BYTES and (small or not _signed(scope)):
            limit = DEFAULT_MAX_BODY_BYTES
        if declared is not None and declared > limit:
            await _too_large(scope, send, limit)
            return
        received = 0
        started = answered = False

        async def counted() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:
                        answered = True
                        await _too_large(scope, send, limit)
                    # the application sees the client gone and stops reading
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if answered:
                return  # whatever the application makes of the "disconnect": we have answered
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not answered:
                raise
