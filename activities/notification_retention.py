"""The notification service's retention: events past their age whose deliveries are all done
(delivered or dead; their delivery rows go with them, ON DELETE CASCADE) and dead letters past
theirs. An event with a delivery still pending is kept whatever its age: nothing accepted for
delivery is lost to retention. Deletes run in bounded slices so no transaction holds a month
of rows at once."""

from __future__ import annotations

from datetime import timedelta

from fleetflow.contracts.retention import (
    DEAD_LETTER_RETENTION_DAYS,
    EVENT_RETENTION_DAYS,
    NotificationRetained,
    RetentionRequest,
)
from fleetflow.db import Pool

SLICE = 10_000


async def apply_retention(pool: Pool, request: RetentionRequest) -> NotificationRetained:
    """Delete what is past its age at request.now (the database's clock when None)."""
    now = request.now or await pool.fetchval("SELECT now()")
    events_cutoff = now - timedelta(days=EVENT_RETENTION_DAYS)
    dead_cutoff = now - timedelta(days=DEAD_LETTER_RETENTION_DAYS)
    dead = 0
    while True:
        result = await pool.execute(
            """DELETE FROM notification.deliveries WHERE delivery_id IN (
                   SELECT delivery_id FROM notification.deliveries
                   WHERE status = 'dead' AND updated_at < $1 LIMIT $2)""",
            dead_cutoff,
            SLICE,
        )
        deleted = int(str(result).split()[-1])
        dead += deleted
        if deleted < SLICE:
            break
    events = 0
    while True:
        result = await pool.execute(
            """DELETE FROM notification.events WHERE seq IN (
                   SELECT e.seq FROM notification.events e
                   WHERE e.occurred_at < $1 AND NOT EXISTS (
                       SELECT 1 FROM notification.deliveries d
                       WHERE d.event_seq = e.seq AND d.status = 'pending')
                   LIMIT $2)""",
            events_cutoff,
            SLICE,
        )
        deleted = int(str(result).split()[-1])
        events += deleted
        if deleted < SLICE:
            break
    return NotificationRetained(events_deleted=events, dead_letters_deleted=dead)
