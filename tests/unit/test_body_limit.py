"""The body limit refuses a body over its route's limit before the application reads it:
a declared Content-Length at once, a chunked body at the first byte over."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from api import limits
from api.limits import BodyLimit, body_limit
from fleetflow.security import issue_device_credential
from fleetflow.settings import Settings
from tests.support import TEST_KEYS, TEST_KEYS_DIR, bearer

MIB = 1024 * 1024
# what BodyLimit reads of the application: its settings, for the key set that signs tokens
_APP = SimpleNamespace(
    state=SimpleNamespace(fleetflow=SimpleNamespace(settings=Settings(keys_dir=TEST_KEYS_DIR)))
)
Message = MutableMapping[str, Any]


class Recorder:
    """An ASGI application that reads the whole body, and a client that counts what it sent."""

    def __init__(self, chunks: int, chunk_bytes: int, content_length: int | None) -> None:
        self.chunks, self.chunk_bytes, self.content_length = chunks, chunk_bytes, content_length
        self.sent_bytes = 0  # of the body, handed to the application
        self.read_calls = 0
        self.app_called = False
        self.app_saw_disconnect = False
        self.responses: list[Message] = []

    def scope(self, path: str = "/v1/devices", token: str | None = None) -> dict[str, Any]:
        headers = [(b"content-type", b"application/json")]
        if self.content_length is not None:
            headers.append((b"content-length", str(self.content_length).encode()))
        if token is not None:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        return {"type": "http", "method": "POST", "path": path, "headers": headers, "app": _APP}

    async def receive(self) -> Message:
        self.read_calls += 1
        if self.read_calls > self.chunks:
            return {"type": "http.disconnect"}
        self.sent_bytes += self.chunk_bytes
        more = self.read_calls < self.chunks
        return {"type": "http.request", "body": b"x" * self.chunk_bytes, "more_body": more}

    async def send(self, message: Message) -> None:
        self.responses.append(message)

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        self.app_called = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.app_saw_disconnect = True
                # what a framework does with a vanished client: an error response, or an exception
                await send({"type": "http.response.start", "status": 400, "headers": []})
                await send({"type": "http.response.body", "body": b"client went away"})
                raise RuntimeError("client disconnected")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def status(self) -> int:
        starts = [m for m in self.responses if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.responses
        return int(starts[0]["status"])

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(b"".join(m.get("body", b"") for m in self.responses[1:]))
        return body


async def test_a_declared_oversized_body_is_refused_before_the_application_runs() -> None:
    client = Recorder(chunks=64, chunk_bytes=MIB, content_length=64 * MIB)
    await BodyLimit(client.app)(client.scope(), client.receive, client.send)
    assert client.status() == 413
    assert client.read_calls == 0 and not client.app_called  # not one byte of the body was read
    start = client.responses[0]
    assert (b"content-type", b"application/problem+json") in start["headers"]
    assert (b"connection", b"close") in start["headers"]  # the server does not read the rest either
    problem = client.problem()
    assert problem["status"] == 413 and problem["instance"] == "/v1/devices"
    assert str(limits.DEFAULT_MAX_BODY_BYTES) in problem["detail"]


async def test_a_chunked_body_is_cut_at_the_first_chunk_over_the_limit() -> None:
    client = Recorder(chunks=64, chunk_bytes=256 * 1024, content_length=None)  # 16 MiB, no length
    await BodyLimit(client.app)(client.scope(), client.receive, client.send)
    assert client.status() == 413 and client.problem()["status"] == 413  # the app's 400 was dropped
    assert client.app_saw_disconnect
    # 1 MiB is four chunks: the fifth went over, and nothing more was read
    assert client.read_calls == 5 and client.sent_bytes == 5 * 256 * 1024


async def test_a_body_within_the_limit_reaches_the_application() -> None:
    client = Recorder(chunks=4, chunk_bytes=256 * 1024, content_length=None)  # exactly 1 MiB
    await BodyLimit(client.app)(client.scope(), client.receive, client.send)
    assert client.status() == 202 and client.sent_bytes == limits.DEFAULT_MAX_BODY_BYTES


def _device_credential() -> str:
    now = datetime.now(UTC)
    return issue_device_credential(
        TEST_KEYS,
        tenant="acme",
        device_id="th-1",
        jti="j-1",
        issued_at=now,
        expires_at=now + timedelta(hours=1),
    )


@pytest.mark.parametrize("kind", ["api token", "device credential"])
async def test_a_route_of_the_table_takes_its_own_limit(kind: str) -> None:
    token = bearer()["Authorization"].removeprefix("Bearer ") if kind == "api token" else _device_credential()
    big = Recorder(chunks=1, chunk_bytes=2 * MIB, content_length=2 * MIB)
    await BodyLimit(big.app)(big.scope("/v1/telemetry", token), big.receive, big.send)
    assert big.status() == 202
    over = Recorder(chunks=1, chunk_bytes=0, content_length=2 * MIB + 1)
    await BodyLimit(over.app)(over.scope("/v1/telemetry", token), over.receive, over.send)
    assert over.status() == 413


@pytest.mark.parametrize("token", [None, "not.a.token", "forged"])
async def test_without_a_signed_token_a_body_is_at_most_the_default(token: str | None) -> None:
    """A larger route limit is for callers our keys signed: the route refuses anyone else anyway."""
    if token == "forged":
        header, claims, _ = _device_credential().split(".")
        token = f"{header}.{claims}.AAAA"
    client = Recorder(chunks=1, chunk_bytes=0, content_length=limits.DEFAULT_MAX_BODY_BYTES + 1)
    await BodyLimit(client.app)(client.scope("/v1/telemetry", token), client.receive, client.send)
    assert client.status() == 413 and not client.app_called


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/devices", limits.DEFAULT_MAX_BODY_BYTES),
        ("/v1/telemetry", 2 * MIB),
        ("/v1/devices:bulk", 8 * MIB),
        ("/v1/firmware", 256 * MIB),
        ("/v1/devices/th-1/twin/desired", limits.TWIN_DOCUMENT_MAX_BYTES),
        ("/v1/device/twin/reported", limits.TWIN_DOCUMENT_MAX_BYTES),
        ("/v1/devices/th-1/twin/desired/extra", limits.DEFAULT_MAX_BODY_BYTES),
        ("/v1/telemetryx", limits.DEFAULT_MAX_BODY_BYTES),
    ],
)
def test_the_limit_table_matches_the_routes_own_limits(path: str, expected: int) -> None:
    assert body_limit(path) == expected


async def test_a_small_declared_length_does_not_lift_the_limit_of_a_chunked_body() -> None:
    """`Content-Length: 10` with `Transfer-Encoding: chunked`: h11 frames the body by the
    chunks, so the length says nothing of what arrives. An anonymous caller still gets at most
    the default (before: the route's 8 MiB, because a small length skipped the token check)."""
    client = Recorder(chunks=16, chunk_bytes=256 * 1024, content_length=10)  # 4 MiB, chunked
    scope = client.scope("/v1/rollouts")
    scope["headers"].append((b"transfer-encoding", b"chunked"))
    await BodyLimit(client.app)(scope, client.receive, client.send)
    assert client.status() == 413
    assert client.sent_bytes <= limits.DEFAULT_MAX_BODY_BYTES + 256 * 1024


@pytest.mark.parametrize("path", ["/v1/rollouts", "/v1/devices:bulk", "/codec/decode", "/v1/firmware"])
async def test_a_device_credential_gets_no_larger_limit_on_an_operator_route(path: str) -> None:
    """A device's credential (the one most likely to leak, from hardware in the field) is
    refused by these routes, which parse a JSON body before their token check: it may not
    make the API read and parse 8 MiB (or take 256 MiB) first."""
    client = Recorder(chunks=1, chunk_bytes=0, content_length=limits.DEFAULT_MAX_BODY_BYTES + 1)
    await BodyLimit(client.app)(client.scope(path, _device_credential()), client.receive, client.send)
    assert client.status() == 413 and not client.app_called


@pytest.mark.parametrize(
    ("path", "scopes", "allowed"),
    [
        ("/v1/rollouts", ["events:read"], False),
        ("/v1/rollouts", ["rollouts:admin"], True),
        ("/v1/rollouts", ["admin"], True),
        ("/codec/decode", ["admin"], False),  # admin does not include codec:decode
        ("/codec/decode", ["codec:decode"], True),
        ("/v1/telemetry", ["events:read"], True),  # read after the token is checked: no need
    ],
)
async def test_a_body_parsed_before_the_token_check_needs_the_routes_scope(
    path: str, scopes: list[str], allowed: bool
) -> None:
    """/v1/rollouts and /codec/* take a JSON body that FastAPI parses before their scope is
    checked (7.3 MiB of device ids: ~140 ms of the event loop, then a 403 that costs no
    quota): their larger limit is for tokens holding their scope; others get the default."""
    token = bearer(scopes=scopes)["Authorization"].removeprefix("Bearer ")
    client = Recorder(chunks=1, chunk_bytes=2 * MIB, content_length=2 * MIB)
    await BodyLimit(client.app)(client.scope(path, token), client.receive, client.send)
    assert client.status() == (202 if allowed else 413)


def test_the_largest_campaign_the_contract_accepts_fits_the_rollout_body_limit() -> None:
    """100,000 explicit targets of the longest device id: the route's contract accepts them,
    so its body limit must too (8 MiB answered 413 to a 13 MB list)."""
    from fleetflow.contracts.rollouts import RolloutRequest

    ids = [f"{i:06d}".ljust(128, "x") for i in range(100_000)]
    body = {
        "campaign_id": "c" * 64,
        "firmware_id": "f" * 200,
        "target": {"device_ids": ids, "tags": []},
        "policy": {"canary_percent": 1.5, "rate_per_minute": 60000.0},
    }
    assert RolloutRequest.model_validate(body).target.device_ids == ids
    assert len(json.dumps(body, indent=1).encode()) <= body_limit("/v1/rollouts")
