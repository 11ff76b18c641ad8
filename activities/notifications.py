"""The notification service: the durable event store and the event bus; owns the `notification` schema.

`record_events` stores each event once (keyed by its tenant and id) and, in the same
transaction, enqueues a delivery for every subscription of the event's tenant whose event types
match; it then nudges those subscriptions' `EventDelivery` workflows. Each workflow
calls `deliver_pending` (activities/webhook_delivery.py, on the `webhook` task queue), which
POSTs its subscription's deliveries in `seq` order.
Subscriptions are written here directly (not through a workflow) so that their
secrets never enter a Temporal history, and their secrets are stored sealed with the
platform's payload key (`sealed:<kid>:...`), so a database dump does not hold them either.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from activities.poison import poison_guard
from activities.probe import probe
from fleetflow import identity
from fleetflow.contracts.common import DomainEvent, TaskQueue
from fleetflow.contracts.events import (
    EVENT_DELIVERY_WORKFLOW,
    MIN_BACKOFF_S,
    DeliveryInput,
    DeliveryView,
    EventBatch,
    RecordedEvent,
    RetractEvent,
    RetractEvents,
    SecretRotation,
    SubscriptionRequest,
    SubscriptionView,
    delivery_workflow_id,
)
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import BATCH_QUARANTINED, TELEMETRY_STORED, WindowRef
from fleetflow.db import Pool
from fleetflow.payload_codec import SEALED, PayloadKeys, seal_text
from fleetflow.temporal import device_search_attributes
from fleetflow.webhook_network import AddressPolicy

log = logging.getLogger(__name__)

SECRET_PURPOSE = "webhook-secret"  # authenticated with each sealed secret
_EVENT = "e.seq, e.event_id, e.tenant, e.device_id, e.type, e.occurred_at, e.actor, e.source_workflow, e.data"
_DELIVERY = f"d.delivery_id, d.subscription_id, d.status, d.attempts, d.last_error, d.updated_at, {_EVENT}"
_SUBSCRIPTION = """s.subscription_id, s.tenant, s.url, s.event_types, s.max_attempts, s.backoff_s,
    s.max_backoff_s, s.created_by, s.created_at,
    CASE WHEN s.previous_secret_expires_at > now() THEN s.previous_secret_expires_at END
        AS rotation_overlap_until,
    (SELECT count(*) FROM notification.deliveries p
     WHERE p.subscription_id = s.subscription_id AND p.status = 'pending') AS pending,
    (SELECT count(*) FROM notification.deliveries p
     WHERE p.subscription_id = s.subscription_id AND p.status = 'dead') AS dead_letters"""


class NotDeadLettered(Exception):
    """Redelivery asked for a delivery that is not a dead letter."""


# rounds of renaming an event whose id another event of its tenant already holds
_RENAME_ROUNDS = 3


def event_digest(event: DomainEvent) -> str:
    """What tells a retry of an event (same digest) from another event reusing its id."""
    canonical = json.dumps(event.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def recorded_event(row: asyncpg.Record) -> RecordedEvent:
    """An event row as the contract."""
    return RecordedEvent.model_validate({k: row[k] for k in RecordedEvent.model_fields})


def _row(event: DomainEvent, digest: str) -> tuple[Any, ...]:
    e = event
    return (e.event_id, e.tenant, e.device_id, e.type, e.occurred_at, e.actor, e.source_workflow, e.data,
            digest)  # fmt: skip


def _delivery(row: asyncpg.Record) -> DeliveryView:
    fields = {k: row[k] for k in DeliveryView.model_fields if k != "event"}
    return DeliveryView(**fields, event=recorded_event(row))


def _subscription(row: asyncpg.Record) -> SubscriptionView:
    fields = {k: row[k] for k in SubscriptionView.model_fields if k != "workflow_id"}
    return SubscriptionView(**fields, workflow_id=delivery_workflow_id(row["tenant"], row["subscription_id"]))


class NotificationService:
    """Activities of the `notification` task queue, the event read model and the subscriptions."""

    queue = TaskQueue.NOTIFICATION

    def __init__(
        self,
        pool: Pool,
        temporal: Client | None = None,
        *,
        keys: PayloadKeys | None = None,
        policy: AddressPolicy | None = None,
    ):
        self.pool = pool
        self.temporal = temporal
        self._keys = keys
        self.policy = policy or AddressPolicy()

    @property
    def keys(self) -> PayloadKeys:
        """The payload keys that seal subscription secrets at rest."""
        if self._keys is None:
            raise RuntimeError("this NotificationService was built without the payload keys")
        return self._keys

    async def seal_stored_secrets(self) -> int:
        """Seal the secrets stored before sealing existed; how many there were."""
        rows = await self.pool.fetch(
            "SELECT subscription_id, secret FROM notification.subscriptions WHERE secret NOT LIKE $1",
            f"{SEALED}%",
        )
        for row in rows:
            sealed = seal_text(self.keys, row["secret"], SECRET_PURPOSE)
            await self.pool.execute(
                """UPDATE notification.subscriptions SET secret = $3
                   WHERE subscription_id = $1 AND secret = $2""",
                row["subscription_id"], row["secret"], sealed,
            )  # fmt: skip
        return len(rows)

    @activity.defn(name="notification.ping")
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)

    # --- the event store -------------------------------------------------------

    @activity.defn(name="notification.record_events")
    async def record_events(self, batch: EventBatch) -> int:
        """Record events once each (keyed by tenant and event id) and enqueue their deliveries;
        returns how many were new. A retry after the commit finds every event there and enqueues
        nothing more. An event whose id its tenant already holds for a *different* event is not
        dropped: it is recorded as `<event_id>#<digest>` (and logged)."""
        if not batch.events:
            return 0
        todo = [(e, event_digest(e)) for e in batch.events]
        seqs: list[int] = []
        async with self.pool.acquire() as conn, conn.transaction():
            for _ in range(_RENAME_ROUNDS):
                inserted = await conn.fetch(
                    """INSERT INTO notification.events (event_id, tenant, device_id, type, occurred_at,
                           actor, source_workflow, data, digest)
                       SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                           $5::timestamptz[], $6::text[], $7::text[], $8::jsonb[], $9::text[])
                       ON CONFLICT (tenant, event_id) DO NOTHING RETURNING seq, tenant, event_id""",
                    *map(list, zip(*(_row(e, d) for e, d in todo), strict=True)),
                )  # fmt: skip
                seqs += [r["seq"] for r in inserted]
                new = {(r["tenant"], r["event_id"]) for r in inserted}
                skipped = [(e, d) for e, d in todo if (e.tenant, e.event_id) not in new]
                todo = await self._reused_ids(conn, skipped)
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
                     ON CONFLICT DO NOTHING RETURNING subscription_id)
                   SELECT array(SELECT DISTINCT subscription_id FROM queued)""",
                seqs,
            )  # fmt: skip
        await self._nudge(queued)
        return len(seqs)

    @staticmethod
    async def _reused_ids(conn: Any, skipped: list[tuple[DomainEvent, str]]) -> list[tuple[DomainEvent, str]]:
        """Of the events not inserted, those whose id holds a different event, renamed
        `<event_id>#<digest>`; the others were recorded before (a retry) and are done."""
        if not skipped:
            return []
        rows = await conn.fetch(
            """SELECT tenant, event_id, digest FROM notification.events
               WHERE (tenant, event_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))""",
            [e.tenant for e, _ in skipped], [e.event_id for e, _ in skipped],
        )  # fmt: skip
        stored = {(r["tenant"], r["event_id"]): r["digest"] for r in rows}
        renamed = []
        for event, digest in skipped:
            held = stored.get((event.tenant, event.event_id))
            if held is None or held == digest:  # a retry (or recorded before digests existed)
                continue
            log.warning(
                "event id %s of tenant %s holds another event: this one is recorded as %s#%s",
                event.event_id, event.tenant, event.event_id, digest[:16],
            )  # fmt: skip
            renamed.append((event.model_copy(update={"event_id": f"{event.event_id}#{digest[:16]}"}), digest))
        return renamed

    @activity.defn(name="notification.record_window_events")
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
        stored = await self.pool.fetchrow(
            "SELECT by_tenant, stored_at FROM data.windows WHERE window_id = $1", ref.window_id
        )
        if stored is not None:
            for tenant, counts in sorted(stored["by_tenant"].items()):
                events.append(DomainEvent(
                    event_id=f"{ref.window_id}/{tenant}/{TELEMETRY_STORED}", tenant=tenant,
                    type=TELEMETRY_STORED, occurred_at=stored["stored_at"], actor="ingestion",
                    source_workflow=source, data={"window_id": ref.window_id, **counts},
                ))  # fmt: skip
        for b in await self.pool.fetch(
            """SELECT tenant, batch_id, readings, reason, quarantined_at,
                      CASE WHEN cardinality(device_ids) = 1 THEN device_ids[1] END AS device_id
               FROM data.ingest_batches WHERE window_id = $1 AND status = 'quarantined'
               ORDER BY tenant, batch_id""",
            ref.window_id,
        ):
            events.append(DomainEvent(
                event_id=f"{ref.window_id}/{b['tenant']}/{b['batch_id']}/{BATCH_QUARANTINED}",
                tenant=b["tenant"], device_id=b["device_id"], type=BATCH_QUARANTINED,
                occurred_at=b["quarantined_at"], actor="ingestion", source_workflow=source,
                data={"window_id": ref.window_id, "batch_id": b["batch_id"], "readings": b["readings"],
                      "reason": b["reason"]},
            ))  # fmt: skip
        events += [
            DomainEvent.model_validate(r["event"])
            for r in await self.pool.fetch(
                "SELECT event FROM analytics.window_events WHERE window_id = $1 ORDER BY tenant, event_id",
                ref.window_id,
            )
        ]
        new = 0
        for start in range(0, len(events), 1000):
            new += await self.record_events(EventBatch(events=events[start : start + 1000]))
            if activity.in_activity():
                activity.heartbeat()
        return new

    @activity.defn(name="notification.retract_event")
    async def retract_event(self, request: RetractEvent) -> None:
        """Compensation of recording an event whose operation was undone (its deliveries go too).
        Only within a tenant: the request's, else the verified caller's (a platform actor, who
        has none, may retract any)."""
        tenant = request.tenant or identity.acting_tenant()
        await self.pool.execute(
            "DELETE FROM notification.events WHERE event_id = $1 AND ($2::text IS NULL OR tenant = $2)",
            request.event_id, tenant,
        )  # fmt: skip

    @activity.defn(name="notification.retract_events")
    async def retract_events(self, request: RetractEvents) -> int:
        """Compensation of the events one undone attempt recorded (a bulk import's, thousands):
        one statement, by their common id prefix."""
        result = await self.pool.execute(
            """DELETE FROM notification.events
               WHERE tenant = $1 AND type = $2 AND starts_with(event_id, $3)
                 AND ($4::text[] IS NULL OR device_id = ANY($4))""",
            request.tenant, request.type, request.id_prefix, request.device_ids,
        )  # fmt: skip
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
            f"""SELECT {_EVENT} FROM notification.events e
               WHERE tenant = $1 AND ($2::text IS NULL OR device_id = $2)
                 AND ($3::text IS NULL OR type = $3) AND ($4::timestamptz IS NULL OR occurred_at >= $4)
                 AND ($5::bigint IS NULL OR seq > $5)
               ORDER BY seq LIMIT $6""",
            tenant, device_id, event_type, since, after, limit,
        )  # fmt: skip
        return [recorded_event(r) for r in rows]

    # --- waking the delivery workflows --------------------------------------------

    async def _nudge(self, subscription_ids: Sequence[str]) -> None:
        """Wake the delivery workflows, starting any that is not running. Best effort: each
        workflow also polls on a timer, so a lost nudge only delays delivery."""
        if not subscription_ids or self.temporal is None:
            return
        rows = await self.pool.fetch(
            "SELECT * FROM notification.subscriptions WHERE subscription_id = ANY($1)", list(subscription_ids)
        )
        results = await asyncio.gather(*(self._signal_with_start(r) for r in rows), return_exceptions=True)
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("deliveries of %s not nudged: %s", row["subscription_id"], result)

    async def _signal_with_start(self, row: asyncpg.Record) -> None:
        if self.temporal is None:
            raise RuntimeError("the notification service needs a Temporal client for subscriptions")
        # subscriptions made before the floor keep their rows; their loops get the floor
        inp = DeliveryInput(
            tenant=row["tenant"], subscription_id=row["subscription_id"],
            backoff_s=max(row["backoff_s"], MIN_BACKOFF_S),
            max_backoff_s=max(row["max_backoff_s"], MIN_BACKOFF_S),
        )  # fmt: skip
        await self.temporal.start_workflow(
            EVENT_DELIVERY_WORKFLOW, inp, id=delivery_workflow_id(inp.tenant, inp.subscription_id),
            task_queue=TaskQueue.ORCHESTRATION.value, start_signal="nudge",
            search_attributes=device_search_attributes(inp.tenant, "event-delivery"),
        )  # fmt: skip

    # --- subscriptions and dead letters (the API's side) ------------------------------

    async def create_subscription(
        self, tenant: str, created_by: str, request: SubscriptionRequest
    ) -> SubscriptionView:
        """Store the subscription and start its delivery workflow; it receives events recorded
        from now on. RefusedAddress when the URL's host is one webhooks may not reach."""
        await self.policy.check_url(str(request.url))
        row = await self.pool.fetchrow(
            """INSERT INTO notification.subscriptions (subscription_id, tenant, url, event_types,
                   secret, max_attempts, backoff_s, max_backoff_s, created_by)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
               RETURNING *, 0 AS pending, 0 AS dead_letters,
                   NULL::timestamptz AS rotation_overlap_until""",
            f"sub-{uuid.uuid4().hex[:20]}", tenant, str(request.url), request.event_types,
            seal_text(self.keys, request.secret, SECRET_PURPOSE),
            request.max_attempts, request.backoff_s, request.max_backoff_s, created_by,
        )  # fmt: skip
        assert row is not None
        try:
            await self._signal_with_start(row)
        except Exception:
            # no workflow, no subscription: the caller may simply try again
            await self.pool.execute(
                "DELETE FROM notification.subscriptions WHERE subscription_id = $1", row["subscription_id"]
            )
            raise
        return _subscription(row)

    async def list_subscriptions(
        self, tenant: str, subscription_id: str | None = None
    ) -> list[SubscriptionView]:
        """The tenant's subscriptions (or the one named), oldest first."""
        rows = await self.pool.fetch(
            f"""SELECT {_SUBSCRIPTION} FROM notification.subscriptions s
               WHERE s.tenant = $1 AND ($2::text IS NULL OR s.subscription_id = $2)
               ORDER BY s.created_at, s.subscription_id""",
            tenant, subscription_id,
        )  # fmt: skip
        return [_subscription(r) for r in rows]

    async def rotate_secret(
        self, tenant: str, subscription_id: str, rotation: SecretRotation
    ) -> SubscriptionView | None:
        """Make rotation's secret the signing one; the replaced one still signs (beside it) for
        `overlap_s`. A secret replaced earlier stops signing now. None if the tenant has no such
        subscription."""
        found = await self.pool.fetchval(
            """UPDATE notification.subscriptions SET secret = $3,
                   previous_secret = CASE WHEN $4::float8 > 0 THEN secret END,
                   previous_secret_expires_at = CASE WHEN $4::float8 > 0
                       THEN now() + make_interval(secs => $4::float8) END
               WHERE tenant = $1 AND subscription_id = $2 RETURNING subscription_id""",
            tenant, subscription_id, seal_text(self.keys, rotation.secret, SECRET_PURPOSE),
            float(rotation.overlap_s),
        )  # fmt: skip
        if found is None:
            return None
        return (await self.list_subscriptions(tenant, subscription_id))[0]

    async def delete_subscription(self, tenant: str, subscription_id: str) -> bool:
        """Delete it with its deliveries and dead letters, and stop its workflow; False if unknown."""
        deleted = await self.pool.fetchval(
            """DELETE FROM notification.subscriptions WHERE tenant = $1 AND subscription_id = $2
               RETURNING subscription_id""",
            tenant, subscription_id,
        )  # fmt: skip
        if deleted is None:
            return False
        if self.temporal is not None:
            try:
                workflow_id = delivery_workflow_id(tenant, subscription_id)
                await self.temporal.get_workflow_handle(workflow_id).cancel()
            except RPCError as exc:  # not running: nothing to stop (a late run ends by itself)
                log.info("deliveries of %s not cancelled: %s", subscription_id, exc)
        return True

    async def dead_letters(
        self, tenant: str, *, subscription_id: str | None = None, after: int | None = None, limit: int = 100
    ) -> list[DeliveryView]:
        """The tenant's dead letters by delivery id."""
        return await self._deliveries(tenant, "d.status = 'dead'", subscription_id, after, limit)

    async def redeliver(self, tenant: str, delivery_id: int) -> DeliveryView | None:
        """Queue a dead letter again (in its seq place, with a fresh attempt budget) and wake its
        workflow; None when the tenant has no such delivery, NotDeadLettered when it is not dead."""
        subscription_id = await self.pool.fetchval(
            """UPDATE notification.deliveries d SET status = 'pending', attempts = 0, updated_at = now()
               FROM notification.subscriptions s
               WHERE d.delivery_id = $2 AND d.status = 'dead'
                 AND s.subscription_id = d.subscription_id AND s.tenant = $1
               RETURNING d.subscription_id""",
            tenant, delivery_id,
        )  # fmt: skip
        found = await self._deliveries(tenant, "d.delivery_id = $5", None, None, 1, delivery_id)
        if not found:
            return None
        if subscription_id is None:
            raise NotDeadLettered(f"delivery {delivery_id} is {found[0].status}, not a dead letter")
        await self._nudge([subscription_id])
        return found[0]

    async def _deliveries(
        self, tenant: str, where: str, subscription_id: str | None, after: int | None, limit: int,
        *extra: Any,
    ) -> list[DeliveryView]:  # fmt: skip
        rows = await self.pool.fetch(
            f"""SELECT {_DELIVERY} FROM notification.deliveries d
               JOIN notification.subscriptions s ON s.subscription_id = d.subscription_id
               JOIN notification.events e ON e.seq = d.event_seq
               WHERE s.tenant = $1 AND {where} AND ($2::text IS NULL OR d.subscription_id = $2)
                 AND ($3::bigint IS NULL OR d.delivery_id > $3)
               ORDER BY d.delivery_id LIMIT $4""",
            tenant, subscription_id, after, limit, *extra,
        )  # fmt: skip
        return [_delivery(r) for r in rows]
