"""Presence of MQTT devices: CONNECT and the end of a connection (DISCONNECT, keep-alive expiry,
a dropped socket, a revocation) set the device's connection online/offline at once, in
`device.mqtt_presence` (through the device service's activities/device_mqtt.py), and record
`DeviceConnected`/`DeviceDisconnected`. The first CONNECT of a device awaiting first contact is
its first contact (as `POST /v1/device-contact`).

The twin's `connection` reads the presence row (api/mqtt_presence.py): an online row says
online whatever `last_seen` says; an offline row newer than `last_seen` says offline.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import asyncpg
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities import device_mqtt
from activities.devices import DeviceService
from activities.notifications import NotificationService
from fleetflow.contracts.common import DomainEvent
from fleetflow.contracts.devices import DeviceStatus, FirstContact
from fleetflow.contracts.events import EventBatch
from fleetflow.db import Pool
from workflows.device_onboarding import DeviceOnboarding, onboarding_id

log = logging.getLogger(__name__)
DEVICE_CONNECTED = "DeviceConnected"
DEVICE_DISCONNECTED = "DeviceDisconnected"


class Presence:
    """Writes presence rows and events for the connections of one gateway node."""

    def __init__(
        self, pool: Pool, devices: DeviceService, events: NotificationService, temporal: Client, node: str
    ) -> None:
        self.pool = pool
        self.devices = devices
        self.events = events
        self.temporal = temporal
        self.node = node

    async def _event(
        self, kind: str, tenant: str, device_id: str, session_id: str, data: dict[str, str]
    ) -> None:
        event = DomainEvent(
            event_id=f"mqtt-{kind}-{tenant}-{device_id}-{session_id}",
            tenant=tenant,
            device_id=device_id,
            type=kind,
            occurred_at=datetime.now(UTC),
            actor=f"device:{device_id}",
            data=data,
        )
        try:
            await self.events.record_events(EventBatch(events=[event]))
        except (OSError, asyncpg.PostgresError, RPCError):
            log.warning("%s of %s/%s not recorded", kind, tenant, device_id, exc_info=True)

    async def connected(self, tenant: str, device_id: str, session_id: str, jti: str) -> None:
        """The device is online; its first CONNECT after onboarding is its first contact."""
        await device_mqtt.mark_online(self.pool, tenant, device_id, session_id, self.node)
        await self._event(DEVICE_CONNECTED, tenant, device_id, session_id, {"transport": "mqtt"})
        device = await self.devices.get_device(tenant, device_id)
        if device is not None and device.status in (DeviceStatus.PENDING, DeviceStatus.PROVISIONED):
            handle = self.temporal.get_workflow_handle(onboarding_id(tenant, device_id))
            try:
                await handle.signal(
                    DeviceOnboarding.first_contact, FirstContact(jti=jti, at=datetime.now(UTC))
                )
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    log.warning("first contact of %s/%s not signalled: %s", tenant, device_id, exc)

    async def disconnected(self, tenant: str, device_id: str, session_id: str, reason: str) -> None:
        """The device's connection ended: the device is offline unless a newer connection holds
        it. Every connection's end is recorded, so each DeviceConnected has its DeviceDisconnected
        (the end of one that a newer connection overtook, in its own write or in time, too)."""
        try:
            changed = await device_mqtt.mark_offline(self.pool, tenant, device_id, session_id)
        except (OSError, asyncpg.PostgresError):
            log.warning("offline of %s/%s not written", tenant, device_id, exc_info=True)
            return
        data = {"reason": reason} if changed else {"reason": reason, "device": "online (newer connection)"}
        await self._event(DEVICE_DISCONNECTED, tenant, device_id, session_id, data)

    async def disconnected_before(self, tenant: str, device_id: str, at_ms: int, reason: str) -> None:
        """A broker's `client.disconnected` event: the session that held the device, if it
        connected before at_ms, has ended (a later connection stays online)."""
        session_id = await device_mqtt.mark_offline_before(self.pool, tenant, device_id, at_ms)
        if session_id is not None:
            await self._event(DEVICE_DISCONNECTED, tenant, device_id, session_id, {"reason": reason})

    async def reset_node(self) -> int:
        """Connections a killed process of this node left online are offline now."""
        ended = await device_mqtt.reset_node(self.pool, self.node)
        for tenant, device_id, session_id in ended:
            reason = {"reason": "gateway restarted"}
            await self._event(DEVICE_DISCONNECTED, tenant, device_id, session_id, reason)
        return len(ended)
