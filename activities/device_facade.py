"""The device service's read facade: what other services and the API may ask of the `device`
schema without an activity. One query per call, whatever the number of ids (these run on the
ingestion path), each scoped by tenant. `db` is a pool or a connection of the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleetflow.metrics import StateGauge

# the devices max_devices counts (the API's early check and the device service's registrations)
_COUNTED = "tenant = $1 AND status NOT IN ('decommissioned', 'failed')"


async def count_devices(db: Any, tenant: str) -> int:
    """The tenant's devices that count against max_devices."""
    return int(await db.fetchval(f"SELECT count(*) FROM device.devices WHERE {_COUNTED}", tenant))


async def count_registered(db: Any, tenant: str, device_ids: Sequence[str]) -> int:
    """How many of `device_ids` the tenant already has (counting against max_devices)."""
    return int(
        await db.fetchval(
            f"SELECT count(*) FROM device.devices WHERE {_COUNTED} AND device_id = ANY($2)",
            tenant,
            list(device_ids),
        )
    )


async def activated_by(db: Any, tenant: str, owner: str, device_ids: Sequence[str]) -> list[str]:
    """Those of `device_ids` the onboarding attempt `owner` holds `active` (a bulk slice's)."""
    rows = await db.fetch(
        """SELECT device_id FROM device.devices
           WHERE tenant = $1 AND onboarding_id = $2 AND status = 'active' AND device_id = ANY($3)
           ORDER BY device_id""",
        tenant,
        owner,
        list(device_ids),
    )
    return [r["device_id"] for r in rows]


async def device_types(db: Any, series: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(tenant, device id) -> device type, for the registered devices among `series`."""
    if not series:
        return {}
    tenants, device_ids = (list(column) for column in zip(*series, strict=True))
    rows = await db.fetch(
        """SELECT d.tenant, d.device_id, d.device_type
           FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[]) AS u(tenant, device_id)) u
           JOIN device.devices d USING (tenant, device_id)""",
        tenants,
        device_ids,
    )
    return {(r["tenant"], r["device_id"]): r["device_type"] for r in rows}


async def active_device_types(db: Any, devices: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(tenant, device id) -> device type, for the active devices among `devices` (those whose
    readings the windows do not quarantine)."""
    if not devices:
        return {}
    tenants, device_ids = (list(column) for column in zip(*devices, strict=True))
    rows = await db.fetch(
        """SELECT d.tenant, d.device_id, d.device_type
           FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[]) AS u(tenant, device_id)) u
           JOIN device.devices d USING (tenant, device_id) WHERE d.status = 'active'""",
        tenants,
        device_ids,
    )
    return {(r["tenant"], r["device_id"]): r["device_type"] for r in rows}


async def count_unready(db: Any, senders: Sequence[tuple[str, str]]) -> int:
    """How many of `senders` (tenant, device id) may not send: unknown, or not active (what
    `device.find_unready` notes for a window)."""
    if not senders:
        return 0
    tenants, device_ids = (list(column) for column in zip(*senders, strict=True))
    return int(
        await db.fetchval(
            """SELECT count(*) FROM unnest($1::text[], $2::text[]) AS w(tenant, device_id)
               LEFT JOIN device.devices d USING (tenant, device_id)
               WHERE d.status IS DISTINCT FROM 'active'""",
            tenants,
            device_ids,
        )
    )


async def window_unready(db: Any, window_id: str) -> list[tuple[str, str, str]]:
    """(tenant, device id, reason) of a telemetry window's devices that may not send, as
    `device.find_unready` noted them."""
    rows = await db.fetch(
        "SELECT tenant, device_id, reason FROM device.window_unready WHERE window_id = $1", window_id
    )
    return [(r["tenant"], r["device_id"], r["reason"]) for r in rows]


async def rollout_status(db: Any, unfinished: Sequence[str]) -> list[dict[str, Any]]:
    """Counts per campaign of the rollouts with devices still in an `unfinished` state (the
    status screen): at most 20."""
    rows = await db.fetch(
        """SELECT tenant, campaign_id, kind, count(*) AS devices,
                  count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
                  count(*) FILTER (WHERE state IN ('failed', 'timed_out')) AS failed,
                  count(*) FILTER (WHERE state = ANY($1)) AS unfinished
           FROM device.rollout_jobs GROUP BY tenant, campaign_id, kind
           HAVING count(*) FILTER (WHERE state = ANY($1)) > 0
           ORDER BY tenant, campaign_id, kind LIMIT 20""",
        list(unfinished),
        timeout=5,
    )
    return [dict(r.items()) for r in rows]


async def consistency_findings(
    db: Any, run_id: str, after: tuple[str, str], last: tuple[str, str]
) -> list[dict[str, Any]]:
    """A run's findings of the devices after `after` up to `last` (tenant, device id): one page
    of the registry as Reconciliation checked it."""
    rows = await db.fetch(
        """SELECT type, tenant, device_id, detail, repaired, found_at FROM device.consistency_findings
           WHERE run_id = $1 AND (tenant, device_id) > ($2, $3) AND (tenant, device_id) <= ($4, $5)
           ORDER BY tenant, device_id, type""",
        run_id,
        *after,
        *last,
    )
    return [dict(r.items()) for r in rows]


GAUGES: tuple[StateGauge, ...] = (
    StateGauge(
        "fleetflow.devices",
        "{device}",
        "Devices by status",
        "status",
        "SELECT status, count(*) FROM device.devices GROUP BY status",
    ),
    StateGauge(
        "fleetflow.rollout.devices",
        "{device}",
        "Devices of rollouts still in progress, by job state",
        "state",
        """SELECT state, count(*) FROM device.rollout_jobs j
           WHERE EXISTS (SELECT 1 FROM device.rollout_jobs a
                         WHERE a.tenant = j.tenant AND a.campaign_id = j.campaign_id
                           AND a.state IN ('queued', 'offered', 'downloading', 'installing'))
           GROUP BY state""",
    ),
    StateGauge(
        "fleetflow.consistency.findings",
        "{finding}",
        "Findings of the last finished Reconciliation run, by type",
        "type",
        """SELECT type, count(*) FROM device.consistency_findings
           WHERE run_id = (SELECT run_id FROM device.consistency_runs ORDER BY finished_at DESC LIMIT 1)
           GROUP BY type""",
    ),
)
