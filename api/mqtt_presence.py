"""The twin's `connection` as MQTT presence has it (device.mqtt_presence, written by the
gateway at CONNECT and at the end of the connection): online while connected, offline from
the moment the connection ended, unless the device was seen (HTTP) since."""

from __future__ import annotations

from fleetflow.contracts.twin import TwinView
from fleetflow.db import Pool


async def with_presence(pool: Pool, tenant: str, view: TwinView) -> TwinView:
    """view with its connection from the device's MQTT presence, when it has one."""
    row = await pool.fetchrow(
        "SELECT online, changed_at FROM device.mqtt_presence WHERE tenant = $1 AND device_id = $2",
        tenant,
        view.device_id,
    )
    if row is None:
        return view
    if row["online"]:
        return view.model_copy(update={"connection": "online"})
    if view.last_seen is None or row["changed_at"] >= view.last_seen:
        return view.model_copy(update={"connection": "offline"})
    return view
