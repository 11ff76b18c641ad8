"""The twin's `connection` as MQTT presence has it (kept by the device service,
activities/device_mqtt.py, written by the gateway at CONNECT and at the end of the
connection): online while connected, offline from the moment the connection ended, unless the
device was seen (HTTP) since."""

from __future__ import annotations

from activities.device_mqtt import presence
from fleetflow.contracts.twin import TwinView
from fleetflow.db import Pool


async def with_presence(pool: Pool, tenant: str, view: TwinView) -> TwinView:
    """view with its connection from the device's MQTT presence, when it has one."""
    row = await presence(pool, tenant, view.device_id)
    if row is None:
        return view
    online, changed_at = row
    if online:
        return view.model_copy(update={"connection": "online"})
    if view.last_seen is None or changed_at >= view.last_seen:
        return view.model_copy(update={"connection": "offline"})
    return view
