"""The notification service's read facade: what other services and the API may ask of the
`notification` schema without an activity. `db` is a pool or a connection of the caller's.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fleetflow.metrics import StateGauge


async def count_subscriptions(db: Any, tenant: str) -> int:
    """The tenant's webhook subscriptions (the max_subscriptions quota)."""
    return int(await db.fetchval("SELECT count(*) FROM notification.subscriptions WHERE tenant = $1", tenant))


async def recorded(db: Any, keys: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of the (tenant, event id) pairs are recorded events; one query for all of them."""
    if not keys:
        return set()
    tenants, event_ids = (list(column) for column in zip(*keys, strict=True))
    rows = await db.fetch(
        """SELECT e.tenant, e.event_id FROM unnest($1::text[], $2::text[]) AS k(tenant, event_id)
           JOIN notification.events e USING (tenant, event_id)""",
        tenants,
        event_ids,
    )
    return {(r["tenant"], r["event_id"]) for r in rows}


GAUGES: tuple[StateGauge, ...] = (
    StateGauge(
        "fleetflow.webhooks.dead_letters",
        "{delivery}",
        "Dead letters waiting for redelivery",
        None,
        "SELECT count(*) FROM notification.deliveries WHERE status = 'dead'",
    ),
    StateGauge(
        "fleetflow.webhooks.circuits",
        "{subscription}",
        "Webhook subscriptions whose circuit is open (paused) or half-open (probe due), by state",
        "state",
        # both states always, so a series drops to 0 instead of disappearing
        """SELECT s.state, count(c.subscription_id) FROM unnest(ARRAY['open', 'half_open']) s (state)
           LEFT JOIN notification.circuits c ON s.state = CASE
               WHEN c.state = 'open' AND c.next_probe_at <= now() THEN 'half_open' ELSE c.state END
           GROUP BY s.state""",
    ),
)
