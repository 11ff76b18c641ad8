"""Webhook subscriptions and dead letters of the notification service (the API's side).

Part of the notification service (the `notification` schema): a plain class that the event
store (NotificationService) and the webhook delivery hold, and the API uses directly.
Subscriptions are written here directly (not through a workflow) so that their secrets never
enter a Temporal history, and their secrets are stored sealed with the platform's payload key
(`sealed:<kid>:...`), so a database dump does not hold them either. Each subscription's
`EventDelivery` workflow is started (or woken) by `nudge`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from temporalio.client import Client
from temporalio.service import RPCError

from activities.circuit_breaker import CIRCUIT_COLUMNS, circuit_view
from activities.event_rows import EVENT_COLUMNS, recorded_event
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.events import (
    EVENT_DELIVERY_WORKFLOW,
    MIN_BACKOFF_S,
    DeliveryInput,
    DeliveryView,
    SecretRotation,
    SubscriptionRequest,
    SubscriptionView,
    delivery_workflow_id,
)
from fleetflow.db import Pool
from fleetflow.payload_codec import SEALED, PayloadKeys, seal_text
from fleetflow.temporal import device_search_attributes
from fleetflow.webhook_network import AddressPolicy

log = logging.getLogger(__name__)

SECRET_PURPOSE = "webhook-secret"  # authenticated with each sealed secret
_DELIVERY = (
    f"d.delivery_id, d.subscription_id, d.status, d.attempts, d.last_error, d.updated_at, {EVENT_COLUMNS}"
)
_SUBSCRIPTION = f"""s.subscription_id, s.tenant, s.url, s.event_types, s.max_attempts, s.backoff_s,
    s.max_backoff_s, s.created_by, s.created_at,
    s.circuit_threshold, s.circuit_probe_s, s.circuit_max_probe_s, {CIRCUIT_COLUMNS},
    CASE WHEN s.previous_secret_expires_at > now() THEN s.previous_secret_expires_at END
        AS rotation_overlap_until,
    (SELECT count(*) FROM notification.deliveries p
     WHERE p.subscription_id = s.subscription_id AND p.status = 'pending') AS pending,
    (SELECT count(*) FROM notification.deliveries p
     WHERE p.subscription_id = s.subscription_id AND p.status = 'dead') AS dead_letters"""
_CIRCUIT_JOIN = (
    "LEFT JOIN notification.circuits c ON c.tenant = s.tenant AND c.subscription_id = s.subscription_id"
)


class NotDeadLettered(Exception):
    """Redelivery asked for a delivery that is not a dead letter."""


def _delivery(row: asyncpg.Record) -> DeliveryView:
    fields = {k: row[k] for k in DeliveryView.model_fields if k != "event"}
    return DeliveryView(**fields, event=recorded_event(row))


def _subscription(row: asyncpg.Record) -> SubscriptionView:
    fields = {k: row[k] for k in SubscriptionView.model_fields if k not in ("workflow_id", "circuit")}
    return SubscriptionView(
        **fields,
        workflow_id=delivery_workflow_id(row["tenant"], row["subscription_id"]),
        circuit=circuit_view(row),
    )


class Subscriptions:
    """Subscription administration, dead letters and delivery wake-ups (the notification
    service's; held by NotificationService and WebhookDeliveryService, used by the API)."""

    def __init__(
        self,
        pool: Pool,
        temporal: Client | None = None,
        *,
        keys: PayloadKeys | None = None,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.pool = pool
        self.temporal = temporal
        self._keys = keys
        self.policy = policy or AddressPolicy()

    @property
    def keys(self) -> PayloadKeys:
        """The payload keys that seal subscription secrets at rest."""
        if self._keys is None:
            raise RuntimeError("these Subscriptions were built without the payload keys")
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
                row["subscription_id"],
                row["secret"],
                sealed,
            )
        return len(rows)

    # --- waking the delivery workflows --------------------------------------------

    async def nudge(self, subscription_ids: Sequence[str]) -> None:
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
            raise RuntimeError("subscriptions need a Temporal client to start their deliveries")
        # subscriptions made before the floor keep their rows; their loops get the floor
        inp = DeliveryInput(
            tenant=row["tenant"],
            subscription_id=row["subscription_id"],
            backoff_s=max(row["backoff_s"], MIN_BACKOFF_S),
            max_backoff_s=max(row["max_backoff_s"], MIN_BACKOFF_S),
        )
        await self.temporal.start_workflow(
            EVENT_DELIVERY_WORKFLOW,
            inp,
            id=delivery_workflow_id(inp.tenant, inp.subscription_id),
            task_queue=TaskQueue.ORCHESTRATION.value,
            start_signal="nudge",
            search_attributes=device_search_attributes(inp.tenant, "event-delivery"),
        )

    # --- subscriptions and dead letters (the API's side) ------------------------------

    async def create_subscription(
        self, tenant: str, created_by: str, request: SubscriptionRequest
    ) -> SubscriptionView:
        """Store the subscription and start its delivery workflow; it receives events recorded
        from now on. RefusedAddress when the URL's host is one webhooks may not reach."""
        await self.policy.check_url(str(request.url))
        row = await self.pool.fetchrow(
            """INSERT INTO notification.subscriptions (subscription_id, tenant, url, event_types,
                   secret, max_attempts, backoff_s, max_backoff_s, created_by,
                   circuit_threshold, circuit_probe_s, circuit_max_probe_s)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
               RETURNING *""",
            f"sub-{uuid.uuid4().hex[:20]}",
            tenant,
            str(request.url),
            request.event_types,
            seal_text(self.keys, request.secret, SECRET_PURPOSE),
            request.max_attempts,
            request.backoff_s,
            request.max_backoff_s,
            created_by,
            request.circuit_threshold,
            request.circuit_probe_s,
            request.circuit_max_probe_s,
        )
        assert row is not None
        try:
            await self._signal_with_start(row)
        except Exception:
            # no workflow, no subscription: the caller may simply try again
            await self.pool.execute(
                "DELETE FROM notification.subscriptions WHERE subscription_id = $1", row["subscription_id"]
            )
            raise
        return (await self.list_subscriptions(tenant, row["subscription_id"]))[0]

    async def list_subscriptions(
        self, tenant: str, subscription_id: str | None = None
    ) -> list[SubscriptionView]:
        """The tenant's subscriptions (or the one named), oldest first."""
        rows = await self.pool.fetch(
            f"""SELECT {_SUBSCRIPTION} FROM notification.subscriptions s {_CIRCUIT_JOIN}
               WHERE s.tenant = $1 AND ($2::text IS NULL OR s.subscription_id = $2)
               ORDER BY s.created_at, s.subscription_id""",
            tenant,
            subscription_id,
        )
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
            tenant,
            subscription_id,
            seal_text(self.keys, rotation.secret, SECRET_PURPOSE),
            float(rotation.overlap_s),
        )
        if found is None:
            return None
        return (await self.list_subscriptions(tenant, subscription_id))[0]

    async def delete_subscription(self, tenant: str, subscription_id: str) -> bool:
        """Delete it with its deliveries and dead letters, and stop its workflow; False if unknown."""
        deleted = await self.pool.fetchval(
            """DELETE FROM notification.subscriptions WHERE tenant = $1 AND subscription_id = $2
               RETURNING subscription_id""",
            tenant,
            subscription_id,
        )
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
            tenant,
            delivery_id,
        )
        found = await self._deliveries(tenant, "d.delivery_id = $5", None, None, 1, delivery_id)
        if not found:
            return None
        if subscription_id is None:
            raise NotDeadLettered(f"delivery {delivery_id} is {found[0].status}, not a dead letter")
        await self.nudge([subscription_id])
        return found[0]

    async def _deliveries(
        self,
        tenant: str,
        where: str,
        subscription_id: str | None,
        after: int | None,
        limit: int,
        *extra: Any,
    ) -> list[DeliveryView]:
        rows = await self.pool.fetch(
            f"""SELECT {_DELIVERY} FROM notification.deliveries d
               JOIN notification.subscriptions s ON s.subscription_id = d.subscription_id
               JOIN notification.events e ON e.seq = d.event_seq
               WHERE s.tenant = $1 AND {where} AND ($2::text IS NULL OR d.subscription_id = $2)
                 AND ($3::bigint IS NULL OR d.delivery_id > $3)
               ORDER BY d.delivery_id LIMIT $4""",
            tenant,
            subscription_id,
            after,
            limit,
            *extra,
        )
        return [_delivery(r) for r in rows]
