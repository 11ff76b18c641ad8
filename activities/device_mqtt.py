"""The device service's side of MQTT: the presence of devices' MQTT connections
(`device.mqtt_presence`, one row per device: online, the session holding it, the node serving
it), and the NOTIFY that tells the MQTT processes a device's twin changed.

The MQTT processes (gateway/) write presence through these functions; the API reads it for the
twin's `connection`. `db` is a pool or a connection of the caller's.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fleetflow.contracts.commands import COMMAND_OFFERED_CHANNEL
from fleetflow.mqtt_topics import (
    DESIRED_CHANGED_CHANNEL,
    JOB_OFFERED_CHANNEL,
    REPORTED_CHANGED_CHANNEL,
    SESSION_TAKEN_CHANNEL,
    Topic,
)


async def mark_online(db: Any, tenant: str, device_id: str, session_id: str, node: str) -> None:
    """The device's session `session_id` on `node` holds it now; every MQTT process is told
    (SESSION_TAKEN_CHANNEL, sent at commit), so one holding an older connection closes it."""
    await db.execute(
        """WITH held AS (
               INSERT INTO device.mqtt_presence (tenant, device_id, online, changed_at, session_id, node)
               VALUES ($1, $2, true, now(), $3, $4)
               ON CONFLICT (tenant, device_id) DO UPDATE SET online = true, changed_at = now(),
                   session_id = EXCLUDED.session_id, node = EXCLUDED.node
               RETURNING 1)
           SELECT pg_notify($5, $3 || ' ' || $1 || '/' || $2) FROM held""",
        tenant,
        device_id,
        session_id,
        node,
        SESSION_TAKEN_CHANNEL,
    )


async def mark_offline(db: Any, tenant: str, device_id: str, session_id: str) -> bool:
    """The session ended: True when it held the device (a newer session stays online)."""
    changed = await db.fetchval(
        """UPDATE device.mqtt_presence SET online = false, changed_at = now()
           WHERE tenant = $1 AND device_id = $2 AND session_id = $3 AND online RETURNING 1""",
        tenant,
        device_id,
        session_id,
    )
    return changed is not None


async def reset_node(db: Any, node: str) -> list[tuple[str, str, str]]:
    """Every session `node` left online is offline: (tenant, device id, session id) of each."""
    rows = await db.fetch(
        """UPDATE device.mqtt_presence SET online = false, changed_at = now()
           WHERE node = $1 AND online RETURNING tenant, device_id, session_id""",
        node,
    )
    return [(r["tenant"], r["device_id"], r["session_id"]) for r in rows]


async def has_presence(db: Any, tenant: str, device_id: str) -> bool:
    """Whether the device ever connected over MQTT (its session may be resumed)."""
    seen = await db.fetchval(
        "SELECT 1 FROM device.mqtt_presence WHERE tenant = $1 AND device_id = $2", tenant, device_id
    )
    return seen is not None


async def session_of(db: Any, tenant: str, device_id: str) -> str | None:
    """The session that took the device last (online or not); None when it never connected."""
    held: str | None = await db.fetchval(
        "SELECT session_id FROM device.mqtt_presence WHERE tenant = $1 AND device_id = $2", tenant, device_id
    )
    return held


async def presence(db: Any, tenant: str, device_id: str) -> tuple[bool, datetime] | None:
    """(online, changed_at) of the device's MQTT presence; None when it never connected."""
    row = await db.fetchrow(
        "SELECT online, changed_at FROM device.mqtt_presence WHERE tenant = $1 AND device_id = $2",
        tenant,
        device_id,
    )
    return None if row is None else (bool(row["online"]), row["changed_at"])


async def other_tenant_at(db: Any, tenant: str, device_id: str, node: str) -> str | None:
    """Another tenant whose device of this id has connected through `node` (a broker whose
    client ids are device ids: the id is that tenant's there), or None."""
    other: str | None = await db.fetchval(
        """SELECT tenant FROM device.mqtt_presence WHERE device_id = $1 AND node = $2 AND tenant <> $3
           LIMIT 1""",
        device_id,
        node,
        tenant,
    )
    return other


async def notify_twin_changed(db: Any, tenant: str, device_id: str, reported: bool = False) -> None:
    """Tell the MQTT processes the device's twin changed (they push its desired document and
    delta to the device's connection, wherever it is; after a change of reported, the delta
    when it changed)."""
    channel = REPORTED_CHANGED_CHANNEL if reported else DESIRED_CHANGED_CHANNEL
    await db.execute("SELECT pg_notify($1, $2)", channel, f"{tenant}/{device_id}")


async def mark_offline_before(db: Any, tenant: str, device_id: str, at_ms: int) -> str | None:
    """A broker (EMQX) says the device disconnected at `at_ms`: its session is offline unless
    it connected after that (`emqx-{connected_at}` names it). The session ended, or None."""
    ended: str | None = await db.fetchval(
        """UPDATE device.mqtt_presence SET online = false, changed_at = now()
           WHERE tenant = $1 AND device_id = $2 AND online AND session_id ~ '^emqx-[0-9]{1,18}$'
             AND substr(session_id, 6)::bigint <= $3
           RETURNING session_id""",
        tenant,
        device_id,
        at_ms,
    )
    return ended


async def revoked_device(db: Any, jti: str) -> tuple[str, str] | None:
    """(tenant, device id) of a credential that is revoked or expired; None otherwise."""
    row = await db.fetchrow(
        """SELECT tenant, device_id FROM device.credentials
           WHERE jti = $1 AND (revoked_at IS NOT NULL OR expires_at <= now())""",
        jti,
    )
    return None if row is None else (row["tenant"], row["device_id"])


async def notify_subscribed(db: Any, tenant: str, device_id: str, kind: Topic) -> None:
    """A device subscribed (at a broker) to one of its topics: the MQTT processes push it what
    that topic holds now (desired and delta, its pending job, its pending commands)."""
    if kind in (Topic.TWIN_DESIRED, Topic.TWIN_DELTA):
        await notify_twin_changed(db, tenant, device_id)
    elif kind is Topic.JOBS_NOTIFY:
        await db.execute("SELECT pg_notify($1, $2)", JOB_OFFERED_CHANNEL, f"{tenant}/{device_id}")
    elif kind is Topic.COMMANDS:
        payload = json.dumps({"tenant": tenant, "device_id": device_id})
        await db.execute("SELECT pg_notify($1, $2)", COMMAND_OFFERED_CHANNEL, payload)
