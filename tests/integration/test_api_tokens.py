"""The API's token refusals: each way a token can be wrong gets 401 with its reason, a token
without the route's scope gets 403 naming the scope, and no route is left open by mistake."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from api.app import create_app
from fleetflow.keys import KeyRing
from fleetflow.security import SCOPES, issue_token
from fleetflow.settings import Settings
from tests.support import TEST_KEYS

PUBLIC = {"/livez", "/readyz", "/metrics", "/.well-known/jwks.json"}
DEVICE_ROUTES = {"/v1/device-contact"}  # besides /v1/device/...: device credentials, not API tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(ring: KeyRing = TEST_KEYS, **overrides: object) -> str:
    args: dict[str, object] = {
        "subject": "op",
        "tenant": "acme",
        "scopes": sorted(SCOPES),
        "ttl": timedelta(minutes=5),
    }
    return issue_token(ring, **(args | overrides))  # type: ignore[arg-type]


def _claims() -> dict[str, object]:
    claims: dict[str, object] = jwt.decode(_token(), options={"verify_signature": False})
    return claims


def _unsigned() -> str:
    header = {"alg": "none", "typ": "JWT", "kid": TEST_KEYS.signing_key().kid}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}."


def _hs256_with_public_key() -> str:
    key = TEST_KEYS.signing_key()
    secret = key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def _unknown_kid(tmp_path: Path) -> str:
    return _token(KeyRing(tmp_path / "elsewhere"))


def _wrong_audience() -> str:
    claims = _claims() | {"aud": "someone-else"}
    key = TEST_KEYS.signing_key()
    header = {"alg": "ES256", "typ": "JWT", "kid": key.kid}
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return jwt.encode(claims, pem, algorithm="ES256", headers=header)


REFUSALS: dict[str, tuple[Callable[[Path], str | None], str]] = {
    "missing": (lambda tmp: None, "missing bearer token"),
    "malformed": (lambda tmp: "not.a.jwt", "malformed"),
    "expired": (lambda tmp: _token(ttl=timedelta(seconds=-5)), "expired"),
    "wrong-issuer": (lambda tmp: _token(issuer="evil"), "issuer"),
    "wrong-audience": (lambda tmp: _wrong_audience(), "audience"),
    "unknown-kid": (_unknown_kid, "unknown or retired key"),
    "alg-none": (lambda tmp: _unsigned(), "algorithm 'none'"),
    "hs256-with-public-key": (lambda tmp: _hs256_with_public_key(), "algorithm 'HS256'"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_bad_token_is_refused_with_401_and_its_reason(
    api: httpx.AsyncClient, tmp_path: Path, case: str
) -> None:
    make, reason = REFUSALS[case]
    token = make(tmp_path)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    response = await api.get("/v1/devices", headers=headers)
    assert response.status_code == 401, response.text
    assert reason in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"
    if token:
        assert token not in response.text  # a token is never echoed back


def _routes(settings: Settings) -> list[tuple[str, str]]:
    """(method, path) of every operation the API documents, but the public ones."""
    paths = create_app(settings).openapi()["paths"]
    routes = sorted(
        (method.upper(), path)
        for path, operations in paths.items()
        if path not in PUBLIC
        for method in operations
    )
    assert len(routes) > 30, routes  # the enumeration itself must not come back empty
    return routes


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x-1", path)


def _is_device_route(path: str) -> bool:
    return path.startswith("/v1/device/") or path in DEVICE_ROUTES


async def test_every_route_but_the_probes_and_metrics_needs_a_token(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    open_routes = []
    for method, path in _routes(settings):
        response = await api.request(method, _concrete(path))
        if response.status_code != 401:
            open_routes.append((method, path, response.status_code))
    assert open_routes == []


async def test_a_token_without_the_scope_gets_403_naming_it(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """Every operator route names a documented scope; device routes refuse API tokens outright."""
    no_scopes = {"Authorization": f"Bearer {_token(scopes=[])}"}
    needed: dict[tuple[str, str], str] = {}
    for method, path in _routes(settings):
        response = await api.request(method, _concrete(path), headers=no_scopes)
        if _is_device_route(path) and path != "/v1/telemetry":
            assert response.status_code == 401, (method, path, response.text)
            continue
        assert response.status_code == 403, (method, path, response.text)
        scope = re.fullmatch(r"this needs the '([a-z:]+)' scope( itself \(.+\))?", response.json()["detail"])
        assert scope is not None and scope[1] in SCOPES, (method, path, response.text)
        needed[(method, path)] = scope[1]
    assert needed[("POST", "/v1/devices")] == "devices:write"
    assert needed[("GET", "/v1/devices")] == "devices:read"
    assert needed[("POST", "/v1/telemetry")] == "telemetry:write"
    assert needed[("POST", "/v1/rollouts")] == "rollouts:admin"
    assert needed[("POST", "/codec/decode")] == "codec:decode"


async def test_the_scope_the_route_names_is_enough(api: httpx.AsyncClient) -> None:
    only = {"Authorization": f"Bearer {_token(scopes=['devices:read'])}"}
    assert (await api.get("/v1/devices", headers=only)).status_code == 200
    assert (await api.post("/v1/rollouts", json={}, headers=only)).status_code == 403


async def test_a_rejected_body_is_not_echoed_back(api: httpx.AsyncClient) -> None:
    """A 422 names the field and the reason, never the value (it may be a secret)."""
    secret = "short-secret"  # under the 16 characters a webhook secret needs
    body = {"url": "https://example.com/hook", "event_types": ["*"], "secret": secret}
    response = await api.post("/v1/subscriptions", json=body, headers={"Authorization": f"Bearer {_token()}"})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["body", "secret"]
    assert secret not in response.text
