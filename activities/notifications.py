"""The notification service's event store (record and retract events, read them back); the
service owns the `notification` schema.

`record_events` stores each event once (keyed by its tenant and id) and, in the same
transaction, enqueues a delivery for every subscription of the event's tenant whose event types
match; it then nudges those subscriptions' `EventDelivery` workflows. The rest of the service,
in modules of their own: the subscriptions and dead letters (activities/subscriptions.py, held
here as `self.subscriptions`), the delivery (activities/webhook_delivery.py, on the `webhook`
task queue) and each subscription's circuit breaker (activities/circuit_breaker.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities import analytics_facade, data_facade, device_facade, notification_retention
from activities.circuit_breaker import CIRCUIT_EVENTS, FROM_CIRCUIT_EVENT
from activities.event_rows import EVENT_COLUMNS, recorded_event
from activities.poison import poison_guard
from activities.probe import probe
from activities.subscriptions import Subscriptions
from fleetflow import claim_checks, identity
from fleetflow.contracts.common import DomainEvent, TaskQueue
from fleetflow.contracts.consistency import CONSISTENCY_FINDING, CONSISTENCY_REPAIRED, ConsistencyEvents
from fleetflow.contracts.events import (
    DEVICE_ONBOARDED,
    BulkOnboardedEvents,
    EventBatch,
    RecordedEvent,
    RetractEvent,
    RetractEvents,
)
from fleetflow.contracts.retention import NotificationRetained, RetentionRequest
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import BATCH_QUARANTINED, TELEMETRY_STORED, WindowRef
from fleetflow.db import Pool
from fleetflow.interfaces import implements
from fleetflow.interfaces.notification import NotificationActivities

log = logging.getLogger(__name__)

# rounds of renaming an event whose id another event of its tenant already holds
_RENAME_ROUNDS = 3


def event_digest(event: DomainEvent) -> str:
    """What tells a retry of an event (same digest) from another event reusing its id."""
    canonical = json.dumps(event.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _row(event: DomainEvent, digest: str) -> tuple[Any, ...]:
    e = event
    return (
        e.event_id,
        e.tenant,
        e.device_id,
        e.type,
        e.occurred_at,
        e.actor,
        e.source_workflow,
        e.data,
        digest,
    )


async def store_events(conn: Any, events: Sequence[DomainEvent]) -> tuple[int, list[str]]:
    """Record events once each and enqueue their deliveries, inside the caller's transaction;
    returns how many were new and the subscriptions they were queued for (to nudge after the
    commit). An event whose id its tenant already holds for a *different* event is recorded as
    `<event_id>#<digest>` (and logged)."""
    if not events:
        return 0, []
    todo = [(e, event_digest(e)) for e in events]
    seqs: list[int] = []
    for _ in range(_RENAME_ROUNDS):
        inserted = await conn.fetch(
            """INSERT INTO notification.events (event_id, tenant, device_id, type, occurred_at,
                   actor, source_workflow, data, digest)
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                   $5::timestamptz[], $6::text[], $7::text[], $8::jsonb[], $9::text[])
               ON CONFLICT (tenant, event_id) DO NOTHING RETURNING seq, tenant, event_id""",
            *map(list, zip(*(_row(e, d) for e, d in todo), strict=True)),
        )
        seqs += [r["seq"] for r in inserted]
        new = {(r["tenant"], r["event_id"]) for r in inserted}
        skipped = [(e, d) for e, d in todo if (e.tenant, e.event_id) not in new]
        todo = await _reused_ids(conn, skipped)
        if not todo:
            break
    else:
        raise ApplicationError(f"event ids still taken after renaming: {todo[0][0].event_id}")
    queued = await conn.fetchval(
        """WITH queued AS (
             INSERT INTO notification.deliveries (subscription_id, event_seq)
             SELECT s.subscription_id, e.seq FROM notification.events e
               JOIN notification.subscriptions s ON s.tenant = e.tenant
                AND (e.type = ANY(s.event_types) OR '*' = ANY(s.event_types))
             WHERE e.seq = ANY($1::bigint[])
               -- a circuit's events are not queued behind that circuit (posted to the receiver
               -- whose failures made them, each could open and close it again, one more pair
               -- of events each time, for ever), nor at all when delivering a circuit event
               -- made them (activities/circuit_breaker.py)
               AND NOT coalesce(e.type = ANY($2::text[]) AND (e.data->>'subscription_id' = s.subscription_id
                        OR e.data->>$3 = 'true'), false)
             ON CONFLICT DO NOTHING RETURNING subscription_id)
           SELECT array(SELECT DISTINCT subscription_id FROM queued)""",
        seqs,
        list(CIRCUIT_EVENTS),
        FROM_CIRCUIT_EVENT,
    )
    return len(seqs), list(queued)


async def _reused_ids(conn: Any, skipped: list[tuple[DomainEvent, str]]) -> list[tuple[DomainEvent, str]]:
    """Of the events not inserted, those whose id holds a different event, renamed
    `<event_id>#<digest>`; the others were recorded before (a retry) and are done."""
    if not skipped:
        return []
    rows = await conn.fetch(
        """SELECT tenant, event_id, digest FROM notification.events
           WHERE (tenant, event_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))""",
        [e.tenant for e, _ in skipped],
        [e.event_id for e, _ in skipped],
    )
    stored = {(r["tenant"], r["event_id"]): r["digest"] for r in rows}
    renamed = []
    for event, digest in skipped:
        held = stored.get((event.tenant, event.event_id))
        if held is None or held == digest:  # a retry (or recorded before digests existed)
            continue
        log.warning(
            "event id %s of tenant %s holds another event: this one is recorded as %s#%s",
            event.event_id,
            event.tenant,
            event.event_id,
            digest[:16],
        )
        renamed.append((event.model_copy(update={"event_id": f"{event.event_id}#{digest[:16]}"}), digest))
    return renamed


class NotificationService(NotificationActivities):
    """Activities of the `notification` task queue and the event read model; it holds the
    subscriptions (whose delivery workflows it nudges)."""

    queue = TaskQueue.NOTIFICATION

    def __init__(self, pool: Pool, temporal: Client | None = None) -> None:
        self.pool = pool
        # only to nudge delivery workflows: no keys, no address policy needed here
        self.subscriptions = Subscriptions(pool, temporal)

    @implements(NotificationActivities.ping)
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)

    @implements(NotificationActivities.apply_retention)
    async def apply_retention(self, request: RetentionRequest) -> NotificationRetained:
        """Delete events past their age whose deliveries are done, and old dead letters."""
        return await notification_retention.apply_retention(self.pool, request)

    # --- the event store -------------------------------------------------------

    @implements(NotificationActivities.record_events)
    async def record_events(self, batch: EventBatch) -> int:
        """Record events once each (keyed by tenant and event id) and enqueue their deliveries;
        returns how many were new. A retry after the commit finds every event there and enqueues
        nothing more. An event whose id its tenant already holds for a *different* event is not
        dropped: it is recorded as `<event_id>#<digest>` (and logged)."""
        if not batch.events:
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            new, queued = await store_events(conn, batch.events)
        await self.subscriptions.nudge(queued)
        return new

    @implements(NotificationActivities.record_bulk_onboarded)
    async def record_bulk_onboarded(self, ref: BulkOnboardedEvents) -> int:
        """Record `DeviceOnboarded` for the devices of one bulk slice its attempt activated, read
        from the claim and the device facade; how many were new. Idempotent."""
        rows = await claim_checks.array_slice(self.pool, ref.claim_id, ref.tenant, ref.offset, ref.limit)
        if rows is None:
            raise ApplicationError(f"claim {ref.claim_id} not found", type="ClaimMissing", non_retryable=True)
        ids = [str(row["device_id"]) for row in rows if isinstance(row, dict) and "device_id" in row]
        activated = await device_facade.activated_by(self.pool, ref.tenant, ref.owner, ids)
        events = [
            DomainEvent(
                event_id=f"{ref.event_key}/{device_id}/{DEVICE_ONBOARDED}",
                tenant=ref.tenant,
                device_id=device_id,
                type=DEVICE_ONBOARDED,
                occurred_at=ref.occurred_at,
                actor=ref.actor,
                source_workflow=ref.source_workflow,
                data={"bulk_id": ref.bulk_id},
            )
            for device_id in activated
        ]
        if not events:
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            new, queued = await store_events(conn, events)
        await self.subscriptions.nudge(queued)
        return new

    @implements(NotificationActivities.record_window_events)
    async def record_window_events(self, ref: WindowRef) -> int:
        """Record a telemetry window's events, read from the tables of the services that made
        them (TelemetryStored per tenant from data.windows, BatchQuarantined from the batches
        set aside, alerts from analytics.window_events), a thousand at a time; how many were new.
        Idempotent: each event id names the window and the tenant."""
        async with poison_guard():
            return await self._record_window_events(ref)

    async def _record_window_events(self, ref: WindowRef) -> int:
        source = activity.info().workflow_id if activity.in_activity() else None
        events: list[DomainEvent] = []
        # each from the service that made them, through its read facade
        stored = await data_facade.stored_window(self.pool, ref.window_id)
        if stored is not None:
            for tenant, counts in sorted(stored["by_tenant"].items()):
                events.append(
                    DomainEvent(
                        event_id=f"{ref.window_id}/{tenant}/{TELEMETRY_STORED}",
                        tenant=tenant,
                        type=TELEMETRY_STORED,
                        occurred_at=stored["stored_at"],
                        actor="ingestion",
                        source_workflow=source,
                        data={"window_id": ref.window_id, **counts},
                    )
                )
        for b in await data_facade.quarantined_in_window(self.pool, ref.window_id):
            events.append(
                DomainEvent(
                    event_id=f"{ref.window_id}/{b['tenant']}/{b['batch_id']}/{BATCH_QUARANTINED}",
                    tenant=b["tenant"],
                    device_id=b["device_id"],
                    type=BATCH_QUARANTINED,
                    occurred_at=b["quarantined_at"],
                    actor="ingestion",
                    source_workflow=source,
                    data={
                        "window_id": ref.window_id,
                        "batch_id": b["batch_id"],
                        "readings": b["readings"],
                        "reason": b["reason"],
                    },
                )
            )
        events += [
            DomainEvent.model_validate(event)
            for event in await analytics_facade.window_events(self.pool, ref.window_id)
        ]
        new = 0
        for start in range(0, len(events), 1000):
            new += await self.record_events(EventBatch(events=events[start : start + 1000]))
            if activity.in_activity():
                activity.heartbeat()
        return new

    @implements(NotificationActivities.record_consistency_events)
    async def record_consistency_events(self, page: ConsistencyEvents) -> int:
        """Record an event for each finding of one checked page; how many were new."""
        source = activity.info().workflow_id if activity.in_activity() else None
        findings = await device_facade.consistency_findings(
            self.pool,
            page.run_id,
            (page.after_tenant, page.after_device),
            (page.last_tenant, page.last_device),
        )
        events = [
            DomainEvent(
                event_id=f"{page.run_id}/{f['tenant']}/{f['device_id']}/{f['type']}",
                tenant=f["tenant"],
                device_id=f["device_id"],
                type=CONSISTENCY_REPAIRED if f["repaired"] else CONSISTENCY_FINDING,
                occurred_at=f["found_at"],
                actor="reconciliation",
                source_workflow=source,
                data={"finding": f["type"], "detail": f["detail"], "run_id": page.run_id},
            )
            for f in findings
        ]
        new = 0
        for start in range(0, len(events), 1000):
            new += await self.record_events(EventBatch(events=events[start : start + 1000]))
        return new

    @implements(NotificationActivities.retract_event)
    async def retract_event(self, request: RetractEvent) -> None:
        """Compensation of recording an event whose operation was undone (its deliveries go too).
        Only within a tenant: the request's, else the verified caller's (a platform actor, who
        has none, may retract any)."""
        tenant = request.tenant or identity.acting_tenant()
        await self.pool.execute(
            "DELETE FROM notification.events WHERE event_id = $1 AND ($2::text IS NULL OR tenant = $2)",
            request.event_id,
            tenant,
        )

    @implements(NotificationActivities.retract_events)
    async def retract_events(self, request: RetractEvents) -> int:
        """Compensation of the events one undone attempt recorded (a bulk import's, thousands):
        one statement, by their common id prefix."""
        result = await self.pool.execute(
            """DELETE FROM notification.events
               WHERE tenant = $1 AND type = $2 AND starts_with(event_id, $3)
                 AND ($4::text[] IS NULL OR device_id = ANY($4))""",
            request.tenant,
            request.type,
            request.id_prefix,
            request.device_ids,
        )
        return int(str(result).split()[-1])

    async def list_events(
        self,
        tenant: str,
        *,
        device_id: str | None = None,
        event_type: str | None = None,
        since: datetime | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> list[RecordedEvent]:
        """Events of tenant in recorded order (`after`: only those past that seq)."""
        rows = await self.pool.fetch(
            f"""SELECT {EVENT_COLUMNS} FROM notification.events e
               WHERE tenant = $1 AND ($2::text IS NULL OR device_id = $2)
                 AND ($3::text IS NULL OR type = $3) AND ($4::timestamptz IS NULL OR occurred_at >= $4)
                 AND ($5::bigint IS NULL OR seq > $5)
               ORDER BY seq LIMIT $6""",
            tenant,
            device_id,
            event_type,
            since,
            after,
            limit,
        )
        return [recorded_event(r) for r in rows]
