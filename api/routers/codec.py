"""`/codec`: the Temporal Web UI's remote codec, so an operator reads encrypted payloads.

The UI posts `{"payloads": [...]}` (Temporal's JSON form) to /codec/decode and shows what
comes back. Decoding reveals every tenant's payloads, so it needs the `codec:decode` scope
itself: a tenant's `admin` does not include it. A browser sends no bearer token, so an
operator opens /codec/login once, pastes a token, and the API keeps it in an HttpOnly
cookie for /codec only (the UI must include cross-origin credentials). Only the UI's
origin (TEMPORAL_UI_URL) may call the codec from a browser.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Cookie, Depends, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from temporalio.api.common.v1 import Payloads

from api.auth import Bearer, State, api_claims, token_of, unauthorized
from api.problems import invalid
from fleetflow.payload_codec import EncryptionCodec
from fleetflow.security import TokenClaims

router = APIRouter(prefix="/codec", tags=["codec"])
log = logging.getLogger("fleetflow.codec")

SCOPE = "codec:decode"
COOKIE = "fleetflow_codec"
ALLOWED_HEADERS = "Authorization, Content-Type, X-Namespace"


def _verified(state: State, token: str) -> TokenClaims:
    claims = api_claims(state, token)
    if SCOPE not in claims.scopes:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"this needs the {SCOPE!r} scope itself (admin does not include it)",
        )
    return claims


async def codec_caller(
    state: State, credentials: Bearer, session: Annotated[str | None, Cookie(alias=COOKIE)] = None
) -> TokenClaims:
    """Dependency: a token with codec:decode, from the Authorization header or the session cookie."""
    token = credentials.credentials if credentials is not None and credentials.credentials else session
    if not token:
        raise unauthorized("missing bearer token (or open /codec/login in this browser)")
    return _verified(state, token)


Caller = Annotated[TokenClaims, Depends(codec_caller)]


def _payloads(body: dict[str, Any]) -> Payloads:
    """`{"payloads": [{"metadata": {...}, "data": "..."}]}`, Temporal's JSON form, parsed."""
    try:
        return ParseDict(body, Payloads())
    except ParseError as exc:
        raise invalid(["body", "payloads"], f"not Temporal payloads JSON: {exc}") from None


def _cors(request: Request, state: State, response: Response) -> None:
    origin = request.headers.get("origin")
    if origin and origin == state.settings.temporal_ui_url.rstrip("/"):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"


PAYLOADS_EXAMPLE = {"payloads": [{"metadata": {"encoding": "YmluYXJ5L2VuY3J5cHRlZA=="}, "data": ""}]}


async def _apply(
    request: Request, response: Response, state: State, body: dict[str, Any], op: str
) -> dict[str, Any]:
    """The client's codec's encode or decode (op) over the body's payloads, answered as JSON."""
    codec = state.temporal.data_converter.payload_codec
    if isinstance(codec, EncryptionCodec):  # shown as they are, not refused like a worker's input
        codec = codec.for_reading()
    payloads = list(_payloads(body).payloads)
    try:
        done = await getattr(codec, op)(payloads) if codec else payloads
    except ValueError as exc:  # unknown payload key, tampered payload: say which, never the data
        raise invalid(["body", "payloads"], str(exc)) from None
    _cors(request, state, response)
    answer: dict[str, Any] = MessageToDict(Payloads(payloads=done))
    return answer


PayloadsBody = Annotated[dict[str, Any], Body(examples=[PAYLOADS_EXAMPLE])]


@router.post("/decode", summary="Decrypt payloads for the Temporal Web UI")
async def decode(
    request: Request, response: Response, state: State, caller: Caller, body: PayloadsBody
) -> dict[str, Any]:
    """The payloads decrypted (ones that were not encrypted come back as they are)."""
    decoded = await _apply(request, response, state, body, "decode")
    log.info("codec decode of %d payloads for %s", len(decoded.get("payloads", [])), caller.subject)
    return decoded


@router.post("/encode", summary="Encrypt payloads (the Temporal Web UI's signal and update inputs)")
async def encode(
    request: Request, response: Response, state: State, caller: Caller, body: PayloadsBody
) -> dict[str, Any]:
    """The payloads encrypted with the current payload key."""
    return await _apply(request, response, state, body, "encode")


@router.options("/{operation}", include_in_schema=False)
async def preflight(operation: str, request: Request, state: State) -> Response:
    """CORS preflight: no token (browsers send none); only the Web UI's origin is allowed."""
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    if operation in ("decode", "encode", "session"):
        _cors(request, state, response)
        if "Access-Control-Allow-Origin" in response.headers:
            response.headers["Access-Control-Allow-Methods"] = "POST, DELETE"
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
    return response


@router.post("/session", status_code=status.HTTP_204_NO_CONTENT, summary="Keep a codec token in a cookie")
async def open_session(state: State, credentials: Bearer) -> Response:
    """Checks the bearer token (it must hold codec:decode) and keeps it in an HttpOnly cookie
    for /codec until it expires, so the Web UI can decode from this browser."""
    token = token_of(credentials)
    claims = _verified(state, token)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    ttl = int((claims.expires_at - datetime.now(UTC)).total_seconds())
    response.set_cookie(
        COOKIE,
        token,
        max_age=max(ttl, 0),
        path="/codec",
        httponly=True,
        samesite="lax",
        secure=state.settings.api_url.startswith("https://"),
    )
    return response


@router.delete("/session", status_code=status.HTTP_204_NO_CONTENT, summary="Forget the codec cookie")
async def close_session(caller: Caller) -> Response:
    """Removes the cookie /codec/login set."""
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(COOKIE, path="/codec")
    return response


LOGIN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>fleetflow codec login</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>Decode payloads in the Temporal Web UI</h1>
<p>Paste a token with the <code>codec:decode</code> scope
(<code>fleetflow token issue --tenant ops --scopes codec:decode --ttl 8h</code>).
It is kept in an HttpOnly cookie for <code>/codec</code> until it expires.</p>
<textarea id="token" rows="6" style="width: 100%"></textarea>
<p><button id="go">Keep token</button> <span id="result"></span></p>
<script>
document.getElementById("go").onclick = async () => {
  const token = document.getElementById("token").value.trim();
  const r = await fetch("session", {method: "POST", headers: {Authorization: "Bearer " + token}});
  document.getElementById("result").textContent = r.ok
    ? "done: the Web UI decodes payloads from this browser"
    : "refused: " + ((await r.json()).detail || r.status);
};
</script></body></html>
"""


@router.get("/login", include_in_schema=False, response_class=HTMLResponse)
async def login() -> HTMLResponse:
    """A page where an operator hands this browser a codec token."""
    return HTMLResponse(LOGIN_PAGE, headers={"Cache-Control": "no-store"})
