"""The notification service: the durable event store; owns the `notification` schema."""

from __future__ import annotations

from datetime import datetime

from temporalio import activity

from activities.probe import probe
from fleetflow.contracts.common import DomainEvent, TaskQueue
from fleetflow.contracts.events import EventBatch, RetractEvent
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.db import Pool


class NotificationService:
    """Activities of the `notification` task queue, and the event read model."""

    queue = TaskQueue.NOTIFICATION

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    @activity.defn(name="notification.ping")
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)

    @activity.defn(name="notification.record_events")
    async def record_events(self, batch: EventBatch) -> int:
        """Record events once each (keyed by event id); returns how many were new."""
        rows = [
            (e.event_id, e.tenant, e.device_id, e.type, e.occurred_at, e.actor, e.source_workflow,
             e.data)
            for e in batch.events
        ]  # fmt: skip
        async with self.pool.acquire() as conn:
            result = await conn.fetchval(
                """WITH ins AS (
                     INSERT INTO notification.events (event_id, tenant, device_id, type, occurred_at,
                         actor, source_workflow, data)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                         $5::timestamptz[], $6::text[], $7::text[], $8::jsonb[])
                     ON CONFLICT (event_id) DO NOTHING RETURNING 1)
                   SELECT count(*) FROM ins""",
                *map(list, zip(*rows, strict=True)),
            )  # fmt: skip
        return int(result or 0)

    @activity.defn(name="notification.retract_event")
    async def retract_event(self, request: RetractEvent) -> None:
        """Compensation of recording an event whose operation was undone."""
        await self.pool.execute("DELETE FROM notification.events WHERE event_id = $1", request.event_id)

    async def list_events(
        self,
        tenant: str,
        *,
        device_id: str | None = None,
        event_type: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[DomainEvent]:
        """Events of tenant in recorded order."""
        rows = await self.pool.fetch(
            """SELECT event_id, tenant, device_id, type, occurred_at, actor, source_workflow, data
               FROM notification.events
               WHERE tenant = $1 AND ($2::text IS NULL OR device_id = $2)
                 AND ($3::text IS NULL OR type = $3) AND ($4::timestamptz IS NULL OR occurred_at >= $4)
               ORDER BY seq LIMIT $5""",
            tenant, device_id, event_type, since, limit,
        )  # fmt: skip
        return [DomainEvent.model_validate(dict(r.items())) for r in rows]
