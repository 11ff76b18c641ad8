"""Nothing secret in Temporal's history: onboarding payloads (credential, configuration,
metadata) reach the server only as ciphertext, and /codec decodes them for an operator who
holds codec:decode, from the Temporal Web UI's origin only."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import httpx
from google.protobuf.json_format import MessageToDict
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from fleetflow.payload_codec import ENCODING
from fleetflow.settings import Settings
from tests.integration.flows import active_device
from tests.support import bearer

CODEC = bearer("ops", ["codec:decode"])


# search attributes stay in clear: the Web UI finds runs by them
CLEAR = {"search_attributes"}
SERVICE_TOKEN = b"eyJhbGciOiJFUzI1NiIs"  # '{"alg":"ES256",' of every platform JWT, base64url


def _payloads(message: Any) -> list[Payload]:
    """Every Payload inside a protobuf message, however deep, but those of CLEAR fields."""
    found: list[Payload] = []
    if isinstance(message, Payload):
        return [message]
    for field, value in message.ListFields():
        if field.name in CLEAR:
            continue
        items = value if isinstance(value, list) or hasattr(value, "extend") else [value]
        for item in items:
            if hasattr(item, "ListFields"):
                found += _payloads(item)
            elif hasattr(item, "values") and callable(item.values):  # map fields
                for inner in item.values():
                    if hasattr(inner, "ListFields"):
                        found += _payloads(inner)
    return found


async def _onboarded(api: httpx.AsyncClient, client: Client) -> tuple[str, str, str, list[Any]]:
    marker = f"site-{uuid.uuid4().hex}"
    device_id, credential = await active_device(api, metadata={"site": marker}, config={"target_c": 19})
    history = await client.get_workflow_handle(f"onboard-acme-{device_id}").fetch_history()
    return device_id, credential, marker, list(history.events)


async def test_onboarding_history_holds_no_credential_configuration_or_token_in_clear(
    api: httpx.AsyncClient, client: Client
) -> None:
    _, credential, marker, events = await _onboarded(api, client)
    stored = b"".join(event.SerializeToString() for event in events)
    assert marker.encode() not in stored
    assert credential.encode() not in stored
    assert b"target_c" not in stored
    # nor the service identity tokens of its headers: whoever reads a history cannot use them
    assert SERVICE_TOKEN not in stored and b"traceparent" not in stored
    # the SDK writes workflow.patched markers itself, naming the patch in clear
    patches = {e.event_id for e in events if e.marker_recorded_event_attributes.marker_name == "core_patch"}
    payloads = [p for event in events if event.event_id not in patches for p in _payloads(event)]
    assert payloads, "the history carries payloads"
    sealed = [p for p in payloads if p.metadata.get("encoding") == ENCODING]
    assert sealed == payloads
    # the client with the platform's codec does read them back: the marker was in there
    decoded = await client.data_converter.payload_codec.decode(sealed)  # type: ignore[union-attr]
    assert any(marker.encode() in p.data for p in decoded)
    assert any(credential.encode() in p.data for p in decoded)


async def test_codec_endpoint_decodes_for_codec_scope_only(api: httpx.AsyncClient, client: Client) -> None:
    _, _, marker, events = await _onboarded(api, client)
    started = events[0]
    assert started.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    body = MessageToDict(started.workflow_execution_started_event_attributes.input)

    decoded = await api.post("/codec/decode", json=body, headers=CODEC)
    assert decoded.status_code == 200, decoded.text
    [payload] = decoded.json()["payloads"]
    assert base64.b64decode(payload["metadata"]["encoding"]) == b"json/plain"
    assert marker in base64.b64decode(payload["data"]).decode()

    assert (await api.post("/codec/decode", json=body)).status_code == 401
    # a tenant's admin cannot read every tenant's payloads
    refused = await api.post("/codec/decode", json=body, headers=bearer("acme", ["admin"]))
    assert refused.status_code == 403 and "codec:decode" in refused.json()["detail"]
    bad = await api.post("/codec/decode", json={"payloads": [{"nope": 1}]}, headers=CODEC)
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["body", "payloads"]

    # encode then decode is the identity (the UI encodes signal and update inputs)
    plain = {
        "payloads": [
            {
                "metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                "data": base64.b64encode(b'"hello"').decode(),
            }
        ]
    }
    encoded = (await api.post("/codec/encode", json=plain, headers=CODEC)).json()
    assert base64.b64decode(encoded["payloads"][0]["metadata"]["encoding"]) == ENCODING
    assert (await api.post("/codec/decode", json=encoded, headers=CODEC)).json() == plain
    # an unsealed payload (an older run's) is shown as it is: only a worker refuses it
    assert (await api.post("/codec/decode", json=plain, headers=CODEC)).json() == plain


async def test_codec_answers_the_web_ui_origin_only(api: httpx.AsyncClient, settings: Settings) -> None:
    ui = settings.temporal_ui_url
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    allowed = await api.options("/codec/decode", headers={"Origin": ui, **preflight})
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == ui
    assert allowed.headers["access-control-allow-credentials"] == "true"
    other = await api.options("/codec/decode", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    answered = await api.post("/codec/decode", json={"payloads": []}, headers={"Origin": ui, **CODEC})
    assert answered.headers["access-control-allow-origin"] == ui


async def test_a_browser_session_decodes_with_its_cookie_until_closed(api: httpx.AsyncClient) -> None:
    body: dict[str, list[object]] = {"payloads": []}
    try:
        assert (await api.post("/codec/session", headers=bearer("acme", ["admin"]))).status_code == 403
        opened = await api.post("/codec/session", headers=CODEC)
        assert opened.status_code == 204
        cookie = opened.headers["set-cookie"].lower()
        assert "httponly" in cookie and "path=/codec" in cookie and "samesite=lax" in cookie
        assert (await api.post("/codec/decode", json=body)).status_code == 200  # the cookie alone
        assert (await api.delete("/codec/session")).status_code == 204
        assert (await api.post("/codec/decode", json=body)).status_code == 401
    finally:
        api.cookies.clear()  # the session's client is shared by every test
