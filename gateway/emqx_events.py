"""Events of an external broker (EMQX's `$events/client_connected`, `client_disconnected` and
`session_subscribed`, sent by a rule's HTTP action to `POST /v1/mqtt/events`): the presence of
devices connected there, recorded as the embedded gateway records its own (gateway/presence.py),
and a device's subscription turned into the NOTIFY that makes the bridges push what the topic
holds now (its desired document and delta, its pending job, its pending commands).

A session at the broker is named by its `connected_at` (`emqx-{ms}`); a disconnection ends the
session only if it connected before it, so events that arrive late cannot mark a newer
connection offline.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import asyncpg
from pydantic import Field, field_validator
from temporalio.client import Client

from activities import device_mqtt
from activities.devices import DeviceService
from activities.notifications import NotificationService
from fleetflow.contracts.common import Strict
from fleetflow.db import Pool
from fleetflow.mqtt_topics import SUBSCRIBABLE, filter_matches, topic
from gateway.auth import LoginUnavailable
from gateway.presence import Presence

NODE = "emqx"  # presence rows of the broker's devices (never reset by a gateway's restart)
Text = Annotated[str, Field(max_length=8192)]


class BrokerEvent(Strict):
    """The fields the broker's rule selects (`client_attrs.tenant AS tenant`,
    `client_attrs.jti AS jti`); a field the event has not is null (or "undefined")."""

    event: Literal["client.connected", "client.disconnected", "session.subscribed"]
    clientid: Text
    username: Text | None = None
    tenant: Text | None = None
    jti: Text | None = None
    connected_at: Annotated[int, Field(ge=0, le=10**15)] | None = None
    disconnected_at: Annotated[int, Field(ge=0, le=10**15)] | None = None
    reason: Text | None = None
    topic: Text | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _undefined(cls, value: Any) -> Any:
        return None if value in ("undefined", "") else value


async def client_id_free(pool: Pool, tenant: str, device_id: str) -> bool:
    """Whether the tenant's device may use its id as its client id at the broker: not when
    another tenant's device of that id has connected there. A client id names one session at
    the broker, whoever logs in with it: a second tenant's device would take the first's
    session over, with its subscriptions (that tenant's commands, twin and jobs) and the
    messages queued for it, and disconnect it. LoginUnavailable when the database is away."""
    try:
        return await device_mqtt.other_tenant_at(pool, tenant, device_id, NODE) is None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise LoginUnavailable(str(exc)) from None


async def record_event(pool: Pool, devices: DeviceService, temporal: Client, event: BrokerEvent) -> None:
    """Record one broker event; LoginUnavailable when the database is away (the broker retries)."""
    tenant, device_id = event.tenant, event.username
    if not tenant or not device_id or device_id != event.clientid:
        return  # not a device (a bridge, or a login this hook never allowed)
    presence = Presence(pool, devices, NotificationService(pool, temporal), temporal, NODE)
    try:
        if await devices.get_device(tenant, device_id) is None:
            return  # no such device of that tenant: no presence row, no NOTIFY for it
        if event.event == "client.connected" and event.connected_at is not None:
            session_id = f"emqx-{event.connected_at}"
            await presence.connected(tenant, device_id, session_id, event.jti or "")
        elif event.event == "client.disconnected" and event.disconnected_at is not None:
            reason = event.reason or "disconnected"
            await presence.disconnected_before(tenant, device_id, event.disconnected_at, reason)
        elif event.event == "session.subscribed" and event.topic:
            for kind in SUBSCRIBABLE:  # the filter may hold wildcards past the device's prefix
                if filter_matches(event.topic, topic(tenant, device_id, kind)):
                    await device_mqtt.notify_subscribed(pool, tenant, device_id, kind)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise LoginUnavailable(str(exc)) from None
