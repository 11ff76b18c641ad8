"""Broker hooks: an external MQTT broker (EMQX in docker-compose.temporal.yml) authenticates and
authorizes devices through these, with the rules of the embedded gateway (gateway/auth.py,
fleetflow/mqtt_topics.py). The broker calls them with an API token holding `mqtt:hooks`.

Answers follow EMQX's HTTP authentication and authorization contract: 200 with
`{"result": "allow" | "deny"}`; a login that is allowed carries `client_attrs.tenant`, which
the authorization request sends back (`${client_attrs.tenant}`), so a device id alone (unique
only within its tenant) never decides.

A `fleetflow mqtt-bridge` logs in as username `fleetflow-bridge` with an API token holding
`mqtt:bridge` (which `admin` does not include) as its password; it gets `client_attrs.role =
bridge` and may subscribe to the devices' publishes through the bridges' shared subscriptions
and publish what fleetflow pushes to devices, nothing else.

`POST /v1/mqtt/events` takes EMQX's client.connected / client.disconnected / session.subscribed
events (a rule with an HTTP action): presence as the embedded gateway records it, and a
subscription makes the bridges push what the topic holds now.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import Field

from api.auth import Bearer, State, api_claims, token_of
from api.revocations import TokenRevocations
from fleetflow.contracts.common import Strict
from fleetflow.mqtt_topics import Refusal, filter_matches, publish_target, subscription_allowed
from fleetflow.security import AuthError, TokenClaims, verify_token
from gateway.auth import LoginUnavailable, device_login
from gateway.bridge import BRIDGE_USERNAME, PUSHED, SHARE_GROUP, SUBSCRIPTIONS
from gateway.emqx_events import BrokerEvent, client_id_free, record_event

log = logging.getLogger(__name__)
router = APIRouter(tags=["mqtt"])
HOOK_SCOPE = "mqtt:hooks"


async def _broker(state: State, credentials: Bearer) -> TokenClaims:
    """A token holding mqtt:hooks itself: a tenant's `admin` does not include it (the hooks
    decide for every tenant's devices; with them one tenant could set another's devices
    online or offline, or test credentials)."""
    claims = api_claims(state, token_of(credentials))
    if HOOK_SCOPE not in claims.scopes:
        detail = f"this needs the {HOOK_SCOPE!r} scope itself (admin does not include it)"
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=detail)
    return claims


Hook = Annotated[TokenClaims, Depends(_broker)]
Text = Annotated[str, Field(max_length=8192)]


class AuthRequest(Strict):
    """What the broker sends at CONNECT."""

    clientid: Text
    username: Text = ""
    password: Text = ""


class AclRequest(Strict):
    """What the broker sends for each publish or subscribe."""

    tenant: Text
    username: Text
    topic: Text
    action: Literal["publish", "subscribe", "all"]
    role: Text = ""  # `${client_attrs.role}`: "bridge" for a fleetflow bridge


class HookAnswer(Strict):
    """The decision."""

    result: Literal["allow", "deny"]
    is_superuser: bool = False
    client_attrs: dict[str, str] = Field(default_factory=dict)


DENY = HookAnswer(result="deny")


@router.post("/v1/mqtt/auth", response_model=HookAnswer, response_model_exclude_defaults=True)
async def mqtt_auth(body: AuthRequest, state: State, request: Request, _hook: Hook) -> HookAnswer:
    """Allow a device's CONNECT when its credential would be accepted over HTTP (or a
    bridge's, with a token holding mqtt:bridge)."""
    if body.username == BRIDGE_USERNAME:
        return await _bridge_login(state, request, body)
    try:
        login = await device_login(
            state.settings, state.devices, body.clientid, body.username, body.password.encode()
        )
        if login is not None and not await client_id_free(state.pool, login[0].tenant, login[0].device_id):
            log.warning(
                "MQTT login of %s/%s refused: another tenant's device holds that client id",
                login[0].tenant,
                login[0].device_id,
            )
            return DENY
    except LoginUnavailable:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "cannot check the credential") from None
    if login is None:
        return DENY
    claims, _ = login
    return HookAnswer(result="allow", client_attrs={"tenant": claims.tenant, "jti": claims.jti})


async def _bridge_login(state: State, request: Request, body: AuthRequest) -> HookAnswer:
    try:
        claims = verify_token(state.keys, body.password, state.settings.jwt_issuer)
    except AuthError:
        return DENY
    if "mqtt:bridge" not in claims.scopes:
        return DENY
    # the token comes in the body, where the revoked-token middleware does not look
    revocations: TokenRevocations | None = getattr(request.app.state, "revocations", None)
    try:
        if revocations is None or await revocations.revoked(claims, body.password):
            return DENY
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "cannot check the token") from None
    return HookAnswer(result="allow", client_attrs={"role": "bridge"})


BRIDGE_PUBLISHES = tuple(f"tenants/+/devices/+/{kind.value}" for kind in PUSHED)


def bridge_allowed(action: str, name: str) -> bool:
    """A bridge subscribes to the shared subscriptions of the bridges, publishes to the topics
    devices subscribe to."""
    if action == "subscribe":
        # EMQX versions differ on whether a shared subscription's check names `$share/group/`
        return name in SUBSCRIPTIONS or f"$share/{SHARE_GROUP}/{name}" in SUBSCRIPTIONS
    if action == "publish":
        return "+" not in name and "#" not in name and any(filter_matches(f, name) for f in BRIDGE_PUBLISHES)
    return False


@router.post("/v1/mqtt/acl", response_model=HookAnswer, response_model_exclude_defaults=True)
async def mqtt_acl(body: AclRequest, _hook: Hook) -> HookAnswer:
    """Allow a device's publish or subscribe under its own prefix only."""
    if body.role == "bridge" and body.username == BRIDGE_USERNAME:
        return HookAnswer(result="allow") if bridge_allowed(body.action, body.topic) else DENY
    if not body.tenant or not body.username:
        return DENY
    if body.action == "subscribe":
        allowed = subscription_allowed(body.tenant, body.username, body.topic)
    else:
        try:
            publish_target(body.tenant, body.username, body.topic)
            allowed = True
        except Refusal:
            allowed = False
    return HookAnswer(result="allow") if allowed else DENY


@router.post("/v1/mqtt/events", status_code=status.HTTP_204_NO_CONTENT)
async def mqtt_events(body: BrokerEvent, state: State, _hook: Hook) -> None:
    """Record a device's connection, disconnection or subscription at the broker."""
    try:
        await record_event(state.pool, state.devices, state.temporal, body)
    except LoginUnavailable:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "cannot record the event") from None
