"""Broker hooks: an external MQTT broker (EMQX in docker-compose.temporal.yml) authenticates and
authorizes devices through these, with the rules of the embedded gateway (gateway/auth.py,
fleetflow/mqtt_topics.py). The broker calls them with an API token holding `mqtt:hooks`.

Answers follow EMQX's HTTP authentication and authorization contract: 200 with
`{"result": "allow" | "deny"}`; a login that is allowed carries `client_attrs.tenant`, which
the authorization request sends back (`${client_attrs.tenant}`), so a device id alone (unique
only within its tenant) never decides.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import Field

from api.auth import State, require
from fleetflow.contracts.common import Strict
from fleetflow.mqtt_topics import Refusal, publish_target, subscription_allowed
from fleetflow.security import TokenClaims
from gateway.auth import LoginUnavailable, device_login

router = APIRouter(tags=["mqtt"])
Hook = Annotated[TokenClaims, Depends(require("mqtt:hooks"))]
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


class HookAnswer(Strict):
    """The decision."""

    result: Literal["allow", "deny"]
    is_superuser: bool = False
    client_attrs: dict[str, str] = Field(default_factory=dict)


DENY = HookAnswer(result="deny")


@router.post("/v1/mqtt/auth", response_model=HookAnswer, response_model_exclude_defaults=True)
async def mqtt_auth(body: AuthRequest, state: State, _hook: Hook) -> HookAnswer:
    """Allow a device's CONNECT when its credential would be accepted over HTTP."""
    try:
        login = await device_login(
            state.settings, state.devices, body.clientid, body.username, body.password.encode()
        )
    except LoginUnavailable:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "cannot check the credential") from None
    if login is None:
        return DENY
    claims, _ = login
    return HookAnswer(result="allow", client_attrs={"tenant": claims.tenant})


@router.post("/v1/mqtt/acl", response_model=HookAnswer, response_model_exclude_defaults=True)
async def mqtt_acl(body: AclRequest, _hook: Hook) -> HookAnswer:
    """Allow a device's publish or subscribe under its own prefix only."""
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
