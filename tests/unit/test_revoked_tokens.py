"""The revocation check looks at the token the routes use (the first Authorization header, the
codec cookie of the first Cookie header), once: a request cannot make it verify thousands."""

from __future__ import annotations

from collections.abc import MutableMapping
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from api import revocations
from api.revocations import RevokedTokens
from fleetflow import security
from fleetflow.security import TokenClaims, issue_token
from fleetflow.settings import Settings
from tests.support import TEST_KEYS, TEST_KEYS_DIR

Message = MutableMapping[str, Any]


class _Revoked:
    """TokenRevocations as the middleware sees it: these jtis are revoked."""

    def __init__(self, *jtis: str) -> None:
        self.jtis = set(jtis)

    async def revoked(self, claims: TokenClaims, token: str) -> bool:
        return claims.jti in self.jtis


def _token(jti: str) -> str:
    return issue_token(
        TEST_KEYS, subject="op", tenant="acme", scopes=["devices:read"], ttl=timedelta(hours=1), jti=jti
    )


async def _status(headers: list[tuple[bytes, bytes]], revoked: _Revoked) -> int:
    app = SimpleNamespace(
        state=SimpleNamespace(
            revocations=revoked, fleetflow=SimpleNamespace(settings=Settings(keys_dir=TEST_KEYS_DIR))
        )
    )
    sent: list[Message] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/livez", "headers": headers, "app": app}
    await RevokedTokens(inner)(scope, receive, send)
    return int(sent[0]["status"])


async def test_many_authorization_headers_cost_one_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 forged tokens (1.2 MB of headers on an anonymous /livez) held the event loop for
    about 0.6 s here, each one's signature checked; the routes read only the first."""
    header, claims, signature = _token("j-1").split(".")
    forged = f"{header}.{claims}.{signature[::-1]}".encode()
    calls = 0
    verify = security.verify_token

    def counted(*args: Any, **kwargs: Any) -> TokenClaims:
        nonlocal calls
        calls += 1
        return verify(*args, **kwargs)

    monkeypatch.setattr(revocations, "verify_token", counted)
    headers = [(b"authorization", b"Bearer " + forged)] * 1000 + [
        (b"cookie", b"fleetflow_codec=" + forged)
    ] * 1000
    assert await _status(headers, _Revoked()) == 200
    assert calls <= 2


async def test_the_token_the_routes_read_is_the_one_checked() -> None:
    revoked, other = _token("gone"), _token("kept")
    first_revoked = [
        (b"authorization", f"Bearer {revoked}".encode()),
        (b"authorization", f"Bearer {other}".encode()),
    ]
    assert await _status(first_revoked, _Revoked("gone")) == 401
    cookie = [(b"cookie", f"x=1;;fleetflow_codec={revoked}".encode())]
    assert await _status(cookie, _Revoked("gone")) == 401
