"""The notification service's webhook deliveries, on their own task queue (`webhook`).

`deliver_pending` POSTs one subscription's pending deliveries in `seq` order. It runs on the
`webhook` queue, so receivers that answer slowly hold webhook slots only, never the slots of
`notification.record_events` that ingestion and onboarding wait on; and one tenant holds at
most `webhook_tenant_slots` of a worker's slots: past that its deliveries are turned away at
once (retried a moment later), so another tenant's deliveries find a free slot.

A receiver that keeps failing opens its subscription's circuit (activities/circuit_breaker.py):
the call then posts nothing and tells the workflow how long to wait for the probe
(`probe_in_s`), its deliveries stay pending in order and no attempt is counted against them.

Every connection goes through the address policy (fleetflow/webhook_network.py), redirects
are not followed, at most a few KB of an answer are read and none of it is stored: a
subscription cannot be used to read what an internal service answers. Deliveries are signed
per Standard Webhooks (fleetflow/webhook_signing.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from datetime import timedelta

import asyncpg
import httpx
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.circuit_breaker import (
    CIRCUIT_COLUMNS,
    CIRCUIT_EVENTS,
    Admission,
    CircuitBreaker,
    CircuitPolicy,
    admission,
    receiver_down,
)
from activities.event_rows import EVENT_COLUMNS, recorded_event
from activities.notifications import store_events
from activities.probe import probe
from activities.subscriptions import SECRET_PURPOSE, Subscriptions
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.events import MIN_BACKOFF_S, DeliverPending, DeliveryProgress, RecordedEvent
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.db import Pool
from fleetflow.interfaces import implements
from fleetflow.interfaces.webhook import WebhookActivities
from fleetflow.payload_codec import PayloadKeys, open_text
from fleetflow.webhook_network import AddressPolicy, webhook_client
from fleetflow.webhook_signing import signed_headers

# a hard cap on one POST whatever the receiver drips, well below the activity's heartbeat timeout
POST_DEADLINE_S = 15.0
# one deliver_pending stops taking new deliveries after this; the workflow calls it again
BATCH_BUDGET_S = 60.0
# read at most this much of an answer (to reuse the connection); it is never stored
MAX_ANSWER_BYTES = 4096
# a tenant at its slot limit is retried after about this long, whatever its backoff
BUSY_RETRY_S = 2.0


def retry_delay(sub: asyncpg.Record, failures: int) -> timedelta:
    """How long a delivery waits after its `failures`-th failed attempt: the subscription's
    backoff doubled per failure, floored and capped. It follows the delivery's own count, not
    the activity's attempt number, which every turn away at the tenant's slot limit raises
    (Temporal's own backoff, grown by those turns, reached `max_backoff_s` at once)."""
    first, cap = max(sub["backoff_s"], MIN_BACKOFF_S), max(sub["max_backoff_s"], MIN_BACKOFF_S)
    return timedelta(seconds=min(first * 2.0 ** min(failures - 1, 32), cap))


def _workflow_id() -> str | None:
    return activity.info().workflow_id if activity.in_activity() else None


def message_id(event: RecordedEvent) -> str:
    """The `webhook-id` of an event: unique across tenants, the same on every retry."""
    return f"{event.tenant}/{event.event_id}"


class WebhookDeliveryService(WebhookActivities):
    """Activities of the `webhook` task queue (part of the notification service and its schema)."""

    queue = TaskQueue.WEBHOOK

    def __init__(
        self,
        pool: Pool,
        keys: PayloadKeys,
        policy: AddressPolicy | None = None,
        http: httpx.AsyncClient | None = None,
        tenant_slots: int = 4,
        *,
        temporal: Client | None = None,
        post_deadline_s: float = POST_DEADLINE_S,
    ) -> None:
        self.pool = pool
        self.keys = keys
        self.policy = policy or AddressPolicy()
        self._http = http
        self.tenant_slots = tenant_slots
        self.post_deadline_s = post_deadline_s
        # the circuits' events go to the event store; their subscribers are nudged through temporal
        subscriptions = Subscriptions(pool, temporal, keys=keys, policy=self.policy)
        self.breaker = CircuitBreaker(pool, store_events, subscriptions.nudge)
        self._running: Counter[str] = Counter()  # tenant -> deliveries running in this process

    @property
    def http(self) -> httpx.AsyncClient:
        """The vetted outbound client; made on first use when the process gave none."""
        if self._http is None:
            self._http = webhook_client(self.policy)
        return self._http

    @implements(WebhookActivities.ping)
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)

    @implements(WebhookActivities.deliver_pending)
    async def deliver_pending(self, request: DeliverPending) -> DeliveryProgress:
        """POST the subscription's pending deliveries in seq order, marking each once delivered.

        A failed POST counts against that delivery's attempts. Below the subscription's
        limit, the activity fails when it has delivered nothing yet (Temporal retries it
        with backoff) or returns when it has (its progress counted; the next call starts
        with fresh backoff). At the limit the delivery becomes a dead letter and the
        activity returns, so the queue moves on. At least once: a crash between a POST
        and its mark sends that event again. While the subscription's circuit is open, nothing
        is posted and `probe_in_s` says when to call again.
        """
        sub = await self.pool.fetchrow(
            f"""SELECT s.tenant, s.url, s.secret, s.max_attempts, s.backoff_s, s.max_backoff_s,
                   s.circuit_threshold, s.circuit_probe_s, s.circuit_max_probe_s, {CIRCUIT_COLUMNS},
                   CASE WHEN s.previous_secret_expires_at > now() THEN s.previous_secret END AS previous
               FROM notification.subscriptions s
               LEFT JOIN notification.circuits c
                 ON c.tenant = s.tenant AND c.subscription_id = s.subscription_id
               WHERE s.subscription_id = $1""",
            request.subscription_id,
        )
        if sub is None:
            return DeliveryProgress(gone=True)
        admitted = admission(sub)
        if admitted.wait_s:
            # open: no POST and no slot taken; the workflow waits for the probe on a timer
            return DeliveryProgress(probe_in_s=admitted.wait_s)
        tenant = sub["tenant"]
        if self._running[tenant] >= self.tenant_slots:
            raise ApplicationError(
                f"tenant {tenant} has {self._running[tenant]} deliveries running here; retried shortly",
                type="TenantBusy",
                category=ApplicationErrorCategory.BENIGN,  # expected under load: logged at DEBUG
                next_retry_delay=timedelta(seconds=BUSY_RETRY_S * random.uniform(0.5, 1.5)),
            )
        self._running[tenant] += 1
        try:
            return await self._deliver(request, sub, admitted)
        finally:
            self._running[tenant] -= 1
            if self._running[tenant] <= 0:
                del self._running[tenant]

    async def _deliver(
        self, request: DeliverPending, sub: asyncpg.Record, admitted: Admission
    ) -> DeliveryProgress:
        secrets = [open_text(self.keys, sub["secret"], SECRET_PURPOSE)]
        if sub["previous"] is not None:
            secrets.append(open_text(self.keys, sub["previous"], SECRET_PURPOSE))
        rows = await self.pool.fetch(
            f"""SELECT d.delivery_id, d.attempts, {EVENT_COLUMNS}
               FROM notification.deliveries d JOIN notification.events e ON e.seq = d.event_seq
               WHERE d.subscription_id = $1 AND d.status = 'pending' ORDER BY d.event_seq LIMIT $2""",
            request.subscription_id,
            request.batch_limit,
        )
        progress = DeliveryProgress(more=len(rows) == request.batch_limit)
        deadline = time.monotonic() + BATCH_BUDGET_S
        tenant, dirty, source = sub["tenant"], admitted.dirty, _workflow_id()
        if admitted.probe and rows:
            await self.breaker.probing(tenant, request.subscription_id)
        for row in rows:
            if time.monotonic() > deadline:
                return progress.model_copy(update={"more": True})
            if activity.in_activity():
                activity.heartbeat(progress.delivered)
            event = recorded_event(row)
            echo = event.type in CIRCUIT_EVENTS  # an opening it makes is recorded, not delivered
            error, answer = await self._post(sub["url"], secrets, event)
            if error is not None and receiver_down(answer):
                dirty = True
                wait_s = await self.breaker.failed(
                    tenant, request.subscription_id, CircuitPolicy.of(sub), error, source, echo=echo
                )
                if wait_s:
                    # the circuit is open: the receiver is down, the event is not at fault
                    await self._note(row["delivery_id"], error)
                    return progress.model_copy(update={"more": False, "probe_in_s": wait_s})
            elif dirty:
                await self.breaker.answered(tenant, request.subscription_id, source)
                dirty = False
            status = await self._mark(row["delivery_id"], error, sub["max_attempts"])
            if status == "delivered":
                progress.delivered += 1
            if status == "gone" and not await self._still_subscribed(request.subscription_id):
                # deleted meanwhile: the rest of the batch is not posted to a URL its tenant
                # gave up (nor retried: the workflow ends)
                return progress.model_copy(update={"gone": True, "more": False})
            if status in ("delivered", "gone"):
                continue
            if status == "dead":
                return progress.model_copy(update={"dead_lettered": 1, "more": True})
            if progress.delivered:
                return progress.model_copy(update={"more": True})
            raise ApplicationError(
                f"event {event.seq} to {sub['url']}: {error} (attempt {row['attempts'] + 1} "
                f"of {sub['max_attempts']})",
                type="DeliveryFailed",
                next_retry_delay=retry_delay(sub, row["attempts"] + 1),
            )
        return progress

    async def _post(
        self, url: str, secrets: list[str], event: RecordedEvent
    ) -> tuple[str | None, int | None]:
        """POST one event: (None when the receiver answered 2xx, else why not (never what it
        said); the HTTP status, None when there was no answer)."""
        body = event.model_dump_json().encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "fleetflow-webhooks/0.2",
            "X-Fleetflow-Event-Type": event.type,
            **signed_headers(secrets, message_id(event), body),
        }
        try:
            async with (
                asyncio.timeout(self.post_deadline_s),
                self.http.stream("POST", url, content=body, headers=headers) as response,
            ):
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= MAX_ANSWER_BYTES:
                        break  # the rest is dropped with the connection
        except (httpx.HTTPError, httpx.InvalidURL, TimeoutError, OSError, ValueError) as exc:
            # counted against the delivery: an error that escaped would hold the queue for ever
            why = str(exc)
            if isinstance(exc, httpx.ProtocolError):
                # the parser quotes the answer after its reason ("illegal header line: b'...'"):
                # the reason only, so no answer reaches the dead letter
                why = why.split(":", 1)[0][:120]
            return f"{type(exc).__name__}: {why}".rstrip(": ")[:500], None
        if response.is_success:
            return None, response.status_code
        return f"HTTP {response.status_code}", response.status_code

    async def _still_subscribed(self, subscription_id: str) -> bool:
        return bool(
            await self.pool.fetchval(
                "SELECT 1 FROM notification.subscriptions WHERE subscription_id = $1", subscription_id
            )
        )

    async def _note(self, delivery_id: int, error: str) -> None:
        """Keep why a delivery was not made, without counting an attempt (its circuit opened)."""
        await self.pool.execute(
            """UPDATE notification.deliveries SET last_error = $2, updated_at = now()
               WHERE delivery_id = $1 AND status = 'pending'""",
            delivery_id,
            error,
        )

    async def _mark(self, delivery_id: int, error: str | None, max_attempts: int) -> str:
        """Record one attempt; returns the delivery's status after it."""
        status = await self.pool.fetchval(
            """UPDATE notification.deliveries SET attempts = attempts + 1, updated_at = now(),
                   last_error = coalesce($2, last_error),
                   status = CASE WHEN $2::text IS NULL THEN 'delivered'
                                 WHEN attempts + 1 >= $3 THEN 'dead' ELSE 'pending' END
               WHERE delivery_id = $1 AND status = 'pending' RETURNING status""",
            delivery_id,
            error,
            max_attempts,
        )
        # gone meanwhile (event retracted, subscription deleted): nothing left to retry
        return str(status or "gone")
