"""The API's edges: body limits on a real server, problem+json errors, the error statuses in
the OpenAPI document, the probes, revoked API tokens, and /docs without a CDN."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from html.parser import HTMLParser
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from temporalio.client import Client

from api.app import create_app
from api.credentials import TTL_S
from cli.key_commands import revoke_token_command
from fleetflow.security import SCOPES, issue_token
from fleetflow.settings import Settings
from tests.support import TEST_KEYS, bearer, eventually, free_port

MIB = 1024 * 1024
HANG_GUARD_S = 60  # only so that a server that waits for the whole body fails instead of hanging
PROBLEM_FIELDS = {"type", "title", "status", "detail", "instance"}


@pytest.fixture(scope="module")
async def server(settings: Settings, client: Client, workers: None) -> AsyncIterator[str]:
    """The API under uvicorn (as `fleetflow api` runs it) on a free port; its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, client),
        host="127.0.0.1",
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
    )
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve())
    await eventually(lambda: asyncio.sleep(0, uv.started or task.done()), bool)
    assert uv.started, task
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    await task


async def _raw_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def test_a_huge_anonymous_body_is_refused_before_it_is_read(server: str) -> None:
    """64 MiB announced, 64 KiB sent: the answer (413) comes without the rest."""
    port = int(server.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/devices HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {64 * MIB}\r\n\r\n".encode()
            + b"[" * 65536
        )
        await writer.drain()
        status, headers, body = await asyncio.wait_for(_raw_response(reader), HANG_GUARD_S)
    finally:
        writer.close()
    assert status == 413, body
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert b'"status": 413' in body and str(1 * MIB).encode() in body


async def _send_huge_chunked_body(port: int) -> tuple[int, dict[str, str], bytes, int]:
    """POST a 64 MiB chunked body; the answer, and how much was sent when it came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/devices HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    sent = 0

    async def send_all() -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            while sent < 64 * MIB:
                writer.write(chunk)
                await writer.drain()
                sent += 65536
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    sender = asyncio.create_task(send_all())
    try:
        status, headers, body = await asyncio.wait_for(_raw_response(reader), HANG_GUARD_S)
    finally:
        writer.close()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
    return status, headers, body, sent


async def test_a_huge_chunked_body_is_cut_off(server: str) -> None:
    """No Content-Length: the server stops reading just past the limit and answers 413."""
    port = int(server.rsplit(":", 1)[1])
    for attempt in range(3):
        try:
            status, headers, body, sent = await _send_huge_chunked_body(port)
            break
        except ConnectionResetError:
            # the server closes with our unread bytes in its buffer, so its kernel sends RST,
            # which may reach this one before the 413 is read (TCP, not the API): send again
            if attempt == 2:
                raise
    assert status == 413, body
    assert headers["content-type"] == "application/problem+json"
    assert sent < 64 * MIB  # the rest was never read (before: all of it, then a 422)


async def test_every_error_is_a_problem(api: httpx.AsyncClient) -> None:
    cases = {
        "unknown route": await api.get("/v1/nowhere"),
        "wrong method": await api.put("/livez"),
        "no token": await api.get("/v1/devices"),
        "no scope": await api.get("/v1/devices", headers=bearer(scopes=["events:read"])),
        "bad field": await api.post("/v1/devices", json={"device_id": "bad id!"}, headers=bearer()),
        "too large": await api.post("/v1/devices", content=b" " * (MIB + 1), headers=bearer()),
    }
    expected = {
        "unknown route": 404,
        "wrong method": 405,
        "no token": 401,
        "no scope": 403,
        "bad field": 422,
        "too large": 413,
    }
    for name, response in cases.items():
        assert response.status_code == expected[name], (name, response.text)
        assert response.headers["content-type"] == "application/problem+json", name
        problem = response.json()
        assert PROBLEM_FIELDS <= set(problem), (name, problem)
        assert problem["status"] == expected[name] and problem["type"] == "about:blank"
        assert problem["instance"] == response.request.url.path and problem["detail"], problem
    assert cases["no token"].headers["www-authenticate"] == "Bearer"
    assert "devices:read" in cases["no scope"].json()["detail"]
    errors = cases["bad field"].json()["errors"]
    assert {"loc", "msg", "type"} == set(errors[0])
    assert ["body", "device_id"] in [e["loc"] for e in errors]
    assert "body.device_id" in cases["bad field"].json()["detail"]
    assert "bad id!" not in cases["bad field"].text  # the value is not echoed back


async def test_the_openapi_document_declares_the_problems(api: httpx.AsyncClient) -> None:
    document = (await api.get("/openapi.json")).json()
    paths = document["paths"]

    def declared(method: str, path: str) -> dict[str, Any]:
        responses: dict[str, Any] = paths[path][method]["responses"]
        return responses

    onboard = declared("post", "/v1/devices")
    assert {"401", "403", "409", "413", "422"} <= set(onboard)
    twin = declared("patch", "/v1/devices/{device_id}/twin/desired")
    assert {"401", "403", "404", "409", "412", "413", "422"} <= set(twin)
    problem_ref = "#/components/schemas/ValidationProblem"
    assert onboard["422"]["content"]["application/problem+json"]["schema"]["$ref"] == problem_ref
    assert onboard["401"]["content"]["application/problem+json"]["schema"]["$ref"].endswith("/Problem")
    schemas = document["components"]["schemas"]
    assert "errors" in schemas["ValidationProblem"]["properties"]
    assert "HTTPValidationError" not in schemas  # FastAPI's {"detail": ...} shape is gone
    assert set(declared("get", "/livez")) == {"200"}  # nothing to refuse


async def test_liveness_and_readiness_need_no_token_and_start_no_workflow(
    api: httpx.AsyncClient, client: Client
) -> None:
    before = await client.count_workflows("WorkflowType = 'SystemCheck'")
    assert (await api.get("/livez")).json() == {"status": "alive"}
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "database": "ok", "temporal": "ok"}
    assert (await client.count_workflows("WorkflowType = 'SystemCheck'")).count == before.count


async def test_readiness_says_which_dependency_is_down_without_its_error(
    settings: Settings, client: Client, workers: None
) -> None:
    app = create_app(settings, client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            app.state.fleetflow.pool.terminate()  # the database is gone for this process
            ready = await http.get("/readyz")
            # nor can a token's revocation be checked: that is not taken as "not revoked"
            unknown = await http.get("/v1/devices", headers=bearer())
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "database": "unreachable", "temporal": "ok"}
    assert unknown.status_code == 503 and unknown.headers["content-type"] == "application/problem+json"
    assert "revoked" in unknown.json()["detail"]


async def test_the_full_system_check_needs_system_read(api: httpx.AsyncClient) -> None:
    assert (await api.get("/health")).status_code == 401
    assert (await api.get("/health", headers=bearer(scopes=["devices:read"]))).status_code == 403
    report = await api.get("/health", headers=bearer(scopes=["system:read"]))
    assert report.status_code == 200 and report.json()["ok"] is True


def _revoke_args(token: str, tenant: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(token=token, tenant=tenant, reason="leaked")


async def test_a_revoked_token_is_refused_everywhere_at_once(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    token = issue_token(
        TEST_KEYS, subject="ops", tenant="acme", scopes=sorted(SCOPES), ttl=timedelta(hours=1)
    )
    sibling = bearer()  # another token of the same tenant
    headers = {"Authorization": f"Bearer {token}"}
    reading = {
        "batch_id": "b-revoked",
        "readings": [{"device_id": "nobody", "metric": "t", "value": 1, "ts": "2026-01-01T00:00:00Z"}],
    }

    async def devices() -> int:
        return (await api.get("/v1/devices", headers=headers)).status_code

    assert await devices() == 200
    assert await devices() == 200  # its "not revoked" is cached now
    assert await revoke_token_command(settings, _revoke_args(token)) == 0
    # the cache keeps a check for TTL_S seconds; the NOTIFY drops it well before
    await eventually(devices, lambda code: code == 401, timeout_s=TTL_S / 2)
    refused = await api.get("/v1/devices", headers=headers)
    assert refused.json()["detail"] == "token revoked" and refused.headers["www-authenticate"] == "Bearer"
    # a route that verifies tokens by itself (telemetry) refuses it too
    assert (await api.post("/v1/telemetry", json=reading, headers=headers)).status_code == 401
    assert (await api.get("/v1/devices", headers=sibling)).status_code == 200


@pytest.mark.parametrize(
    "cookie",
    [
        "fleetflow_codec={token}",
        # headers Python's SimpleCookie stops parsing before the codec cookie, while the route's
        # parser (Starlette's) reads it: the revocation check must read what the route reads
        "x=1;;fleetflow_codec={token}",
        "[x]=1; fleetflow_codec={token}",
        'a="b; fleetflow_codec={token}',
    ],
)
async def test_a_revoked_codec_token_is_refused_in_any_cookie_header(
    api: httpx.AsyncClient, settings: Settings, cookie: str
) -> None:
    token = issue_token(
        TEST_KEYS, subject="ops", tenant="ops", scopes=["codec:decode"], ttl=timedelta(hours=1)
    )
    headers = {"Cookie": cookie.format(token=token)}

    async def decode() -> int:
        return (await api.post("/codec/decode", json={"payloads": []}, headers=headers)).status_code

    assert await decode() == 200  # the route reads the cookie from this header
    assert await revoke_token_command(settings, _revoke_args(token)) == 0
    await eventually(decode, lambda code: code == 401)  # before: 200 for as long as the token lived


async def test_a_revocation_names_its_tenant(api: httpx.AsyncClient, settings: Settings) -> None:
    """Revoking acme's token by jti leaves a globex token with the same jti alone."""
    jti = "shared-jti-0001"

    def token(tenant: str) -> dict[str, str]:
        made = issue_token(
            TEST_KEYS, subject="ops", tenant=tenant, scopes=["devices:read"], ttl=timedelta(hours=1), jti=jti
        )
        return {"Authorization": f"Bearer {made}"}

    assert await revoke_token_command(settings, _revoke_args(jti, tenant="acme")) == 0
    await eventually(lambda: api.get("/v1/devices", headers=token("acme")), lambda r: r.status_code == 401)
    assert (await api.get("/v1/devices", headers=token("globex"))).status_code == 200


async def test_a_token_without_an_id_is_refused(api: httpx.AsyncClient) -> None:
    """A token without a jti could never be revoked."""
    key = TEST_KEYS.signing_key()
    claims = {
        "iss": "fleetflow",
        "aud": "fleetflow-api",
        "sub": "ops",
        "tenant": "acme",
        "scopes": ["devices:read"],
        "exp": 4_000_000_000,
    }
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    token = jwt.encode(claims, pem, algorithm="ES256", headers={"kid": key.kid})
    response = await api.get("/v1/devices", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401 and "jti" in response.json()["detail"]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_load_nothing_from_other_hosts(api: httpx.AsyncClient, page: str) -> None:
    html = await api.get(page)
    assert html.status_code == 200
    assert re.findall(r"https?://[^\s'\"<>]+", html.text) == []  # no CDN, no fonts, no validator
    links = _Links()
    links.feed(html.text)
    assert links.urls and all(url.startswith("/") and not url.startswith("//") for url in links.urls)
    for url in links.urls:
        asset = await api.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
