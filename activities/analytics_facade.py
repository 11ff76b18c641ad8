"""The analytics service's read facade: what other services and the API may ask of the
`analytics` schema without an activity. `db` is a pool or a connection of the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fleetflow.metrics import StateGauge


async def count_rules(db: Any, tenant: str) -> int:
    """The tenant's rules (the max_rules quota)."""
    return int(await db.fetchval("SELECT count(*) FROM analytics.rules WHERE tenant = $1", tenant))


async def rule_exists(db: Any, tenant: str, rule_id: str) -> bool:
    """Whether the tenant has the rule (a replacement does not count against max_rules)."""
    return bool(
        await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM analytics.rules WHERE tenant = $1 AND rule_id = $2)",
            tenant,
            rule_id,
        )
    )


async def watches_any(db: Any, readings: Sequence[tuple[str, str]]) -> bool:
    """Whether an enabled rule that only a stored window can raise (rate, zscore: they weigh
    the series' past) looks at one of `readings` (tenant, metric): its alert waits on that
    window (a claim stops waiting for it to fill). A threshold rule's alert is raised as its
    reading is accepted (api/early_alerts.py); its clear, and an alert the early path leaves
    to the windows, may wait for the fill (README: "Windows wait to fill"). One index probe a
    pair (analytics.rules_window_watched), whatever the number of rules."""
    if not readings:
        return False
    tenants, metrics = (list(column) for column in zip(*readings, strict=True))
    return bool(
        await db.fetchval(
            """SELECT EXISTS (SELECT 1 FROM unnest($1::text[], $2::text[]) AS h(tenant, metric)
                   JOIN analytics.rules r USING (tenant, metric)
                   WHERE r.enabled AND r.kind <> 'threshold')""",
            tenants,
            metrics,
        )
    )


async def threshold_rules(db: Any, tenant: str) -> list[dict[str, Any]]:
    """The tenant's enabled threshold rules (rule_id, device_type, metric, params): what a batch
    is checked against when it is accepted (an alert raised before its window is stored)."""
    rows = await db.fetch(
        """SELECT rule_id, device_type, metric, params FROM analytics.rules
           WHERE tenant = $1 AND enabled AND kind = 'threshold'""",
        tenant,
    )
    return [dict(r) for r in rows]


async def open_alert_keys(db: Any, tenant: str, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """Those of the tenant's (device id, rule id) `pairs` whose alert still holds (open or
    acknowledged): no alert is raised again for them."""
    rows = await db.fetch(
        """SELECT a.device_id, a.rule_id FROM unnest($2::text[], $3::text[]) AS k(device_id, rule_id)
           JOIN analytics.alerts a ON a.tenant = $1 AND a.device_id = k.device_id
             AND a.rule_id = k.rule_id AND a.status <> 'cleared'""",
        tenant,
        [d for d, _ in pairs],
        [r for _, r in pairs],
    )
    return {(r["device_id"], r["rule_id"]) for r in rows}


async def series_seen(
    db: Any, tenant: str, series: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], datetime]:
    """(device id, metric) -> the latest reading time the windows analysed, for those of the
    tenant's `series` they have seen."""
    rows = await db.fetch(
        """SELECT s.device_id, s.metric, s.last_ts FROM unnest($2::text[], $3::text[]) AS k(device_id, metric)
           JOIN analytics.series s ON s.tenant = $1 AND s.device_id = k.device_id AND s.metric = k.metric""",
        tenant,
        [d for d, _ in series],
        [m for _, m in series],
    )
    return {(r["device_id"], r["metric"]): r["last_ts"] for r in rows}


async def window_events(db: Any, window_id: str) -> list[dict[str, Any]]:
    """The events `analytics.evaluate` made of a window (as JSON), by tenant and event id."""
    rows = await db.fetch(
        "SELECT event FROM analytics.window_events WHERE window_id = $1 ORDER BY tenant, event_id", window_id
    )
    return [r["event"] for r in rows]


async def open_alerts_status(db: Any) -> list[dict[str, Any]]:
    """The ten newest open alerts of every tenant, with the total (the status screen)."""
    rows = await db.fetch(
        """SELECT tenant, device_id, rule_id, metric, raised_value, raised_at, count(*) OVER () AS total
           FROM analytics.alerts WHERE status = 'open' ORDER BY alert_id DESC LIMIT 10""",
        timeout=5,
    )
    return [dict(r.items()) for r in rows]


GAUGES: tuple[StateGauge, ...] = (
    StateGauge(
        "fleetflow.alerts.open",
        "{alert}",
        "Open alerts",
        None,
        "SELECT count(*) FROM analytics.alerts WHERE status = 'open'",
    ),
)
