"""A circuit breaker per webhook subscription (part of the notification service and its schema).

Closed, the subscription's deliveries go out as usual. After `circuit_threshold` consecutive
failures of its receiver (no answer in time, a connection error, 5xx, 408 or 429) the circuit
opens: nothing is posted to it, its deliveries stay pending in `seq` order and are not counted
against their attempts, so none becomes a dead letter because the receiver is down. At
`next_probe_at` the circuit is half-open: the next delivery is posted as a probe. An answer
closes it and delivery goes on in order; another failure opens it again, the next probe
`circuit_probe_s` doubled per failed probe, capped at `circuit_max_probe_s`. A 2xx or another
4xx is an answer (the receiver is up; a 4xx counts against that event, as before).

The state is a row of `notification.circuits` (no row: closed, no failures); each opening and
closing is recorded, in the same transaction, as a `SubscriptionCircuitOpened` /
`SubscriptionCircuitClosed` event of the subscription's tenant. An opening made by
delivering a circuit event (another subscription's), and its closing, are recorded with
`from_circuit_event` and delivered to no subscription: delivered, they could make transitions of
their own at a receiver that fails and answers in turn, and two such subscriptions would feed
each other events for ever.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from fleetflow.contracts.common import DomainEvent
from fleetflow.contracts.events import (
    CIRCUIT_CLOSED,
    CIRCUIT_OPENED,
    MIN_BACKOFF_S,
    CircuitState,
    CircuitView,
)
from fleetflow.db import Pool

# in the data of a circuit event made by delivering one (store_events queues it for no one)
FROM_CIRCUIT_EVENT = "from_circuit_event"
CIRCUIT_EVENTS = frozenset({CIRCUIT_OPENED, CIRCUIT_CLOSED})
# HTTP answers that say the receiver cannot take deliveries now (not: refuses this one)
DOWN_STATUSES = frozenset({408, 429})

# the circuit columns of a query joining `notification.circuits c` (absent: closed); an open
# circuit whose probe is due is half-open
CIRCUIT_COLUMNS = """CASE WHEN c.state = 'open' AND c.next_probe_at <= now() THEN 'half_open'
        ELSE coalesce(c.state, 'closed') END AS circuit_state,
    coalesce(c.consecutive_failures, 0) AS circuit_failures, c.opened_at AS circuit_opened_at,
    c.next_probe_at AS circuit_next_probe_at, c.last_error AS circuit_last_error,
    greatest(extract(epoch FROM c.next_probe_at - now()), 0)::float8 AS circuit_wait_s"""

# stores events inside the caller's transaction; returns how many were new and the
# subscriptions to nudge (activities.notifications.store_events)
Record = Callable[[Any, Sequence[DomainEvent]], Awaitable[tuple[int, Sequence[str]]]]
Nudge = Callable[[Sequence[str]], Awaitable[None]]


def receiver_down(status_code: int | None) -> bool:
    """Whether an outcome counts against the circuit: no answer (None), 5xx, 408 or 429."""
    return status_code is None or status_code >= 500 or status_code in DOWN_STATUSES


def circuit_view(row: asyncpg.Record) -> CircuitView:
    """The circuit of a row selected with CIRCUIT_COLUMNS."""
    return CircuitView(
        state=CircuitState(row["circuit_state"]),
        consecutive_failures=row["circuit_failures"],
        opened_at=row["circuit_opened_at"],
        next_probe_at=row["circuit_next_probe_at"],
        last_error=row["circuit_last_error"],
    )


@dataclass(frozen=True)
class CircuitPolicy:
    """A subscription's breaker settings."""

    threshold: int
    probe_s: float
    max_probe_s: float

    @classmethod
    def of(cls, row: asyncpg.Record) -> CircuitPolicy:
        """The policy of a `notification.subscriptions` row."""
        return cls(row["circuit_threshold"], row["circuit_probe_s"], row["circuit_max_probe_s"])

    def probe_delay(self, failed_probes: int) -> float:
        """Seconds from an opening (0) or the `failed_probes`-th failed probe to the next probe."""
        first = max(self.probe_s, MIN_BACKOFF_S)
        return min(first * 2.0 ** min(failed_probes, 32), max(self.max_probe_s, first))


@dataclass(frozen=True)
class Admission:
    """What a delivery call may do: post (`probe`: only its first delivery decides the
    circuit), or nothing for `wait_s`."""

    wait_s: float = 0.0
    probe: bool = False
    # failures or an open circuit are on record: the next answer resets them
    dirty: bool = False


def admission(row: asyncpg.Record) -> Admission:
    """What a row selected with CIRCUIT_COLUMNS allows now."""
    state = CircuitState(row["circuit_state"])
    if state is CircuitState.CLOSED:
        return Admission(dirty=row["circuit_failures"] > 0)
    if state is CircuitState.OPEN:
        return Admission(wait_s=max(row["circuit_wait_s"], MIN_BACKOFF_S), dirty=True)
    return Admission(probe=True, dirty=True)


class CircuitBreaker:
    """The breakers of the subscriptions; `record` and `nudge` come from the event store."""

    def __init__(self, pool: Pool, record: Record, nudge: Nudge | None = None) -> None:
        self.pool = pool
        self._record = record
        self._nudge = nudge

    async def probing(self, tenant: str, subscription_id: str) -> None:
        """The probe is about to be posted: half-open (shown while it runs; a probe cut off by
        a crash is posted again by the next call)."""
        await self.pool.execute(
            """UPDATE notification.circuits SET state = 'half_open', updated_at = now()
               WHERE tenant = $1 AND subscription_id = $2 AND state <> 'closed'""",
            tenant,
            subscription_id,
        )

    async def answered(self, tenant: str, subscription_id: str, source: str | None = None) -> None:
        """The receiver answered: failures forgotten, an open circuit closed (and recorded, and
        delivered when its opening was: watchers see both or neither)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE notification.circuits c SET state = 'closed', consecutive_failures = 0,
                       failed_probes = 0, next_probe_at = NULL, last_error = NULL, updated_at = now()
                   FROM (SELECT state FROM notification.circuits
                         WHERE tenant = $1 AND subscription_id = $2 FOR UPDATE) was
                   WHERE c.tenant = $1 AND c.subscription_id = $2
                     AND (c.consecutive_failures > 0 OR c.state <> 'closed')
                   RETURNING was.state AS was, c.openings, c.opened_at, now() AS at""",
                tenant,
                subscription_id,
            )
            if row is None or row["was"] == CircuitState.CLOSED:
                return
            echo = await conn.fetchval(
                """SELECT coalesce(data->>$3 = 'true', false) FROM notification.events
                   WHERE tenant = $1 AND event_id = $2""",
                tenant,
                self._event_id(subscription_id, row["openings"], CIRCUIT_OPENED),
                FROM_CIRCUIT_EVENT,
            )
            _, queued = await self._record(
                conn,
                [
                    self._event(
                        tenant,
                        subscription_id,
                        CIRCUIT_CLOSED,
                        row["openings"],
                        row["at"],
                        source,
                        {"opened_at": row["opened_at"].isoformat()},
                        bool(echo),
                    )
                ],
            )
        await self._wake(queued)

    async def failed(
        self,
        tenant: str,
        subscription_id: str,
        policy: CircuitPolicy,
        error: str,
        source: str | None = None,
        *,
        echo: bool = False,
    ) -> float:
        """The receiver failed: counted; returns how long the circuit is now open for (0: it
        stays closed). A failure at the threshold opens it (recorded; `echo`: the failure was
        to take a circuit event, the opening is recorded, not delivered); a failed probe opens
        it again for longer."""
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    """INSERT INTO notification.circuits AS c
                           (tenant, subscription_id, consecutive_failures, last_error)
                       VALUES ($1, $2, 1, $3)
                       ON CONFLICT (tenant, subscription_id) DO UPDATE
                       SET consecutive_failures = c.consecutive_failures + 1, last_error = $3,
                           updated_at = now()
                       RETURNING state, consecutive_failures, failed_probes, openings""",
                    tenant,
                    subscription_id,
                    error,
                )
            except asyncpg.ForeignKeyViolationError:
                return 0.0  # the subscription is gone: the delivery finds out
            assert row is not None
            closed = row["state"] == CircuitState.CLOSED
            if closed and row["consecutive_failures"] < policy.threshold:
                return 0.0
            failed_probes = 0 if closed else row["failed_probes"] + 1
            delay = policy.probe_delay(failed_probes)
            opened = await conn.fetchrow(
                """UPDATE notification.circuits SET state = 'open', failed_probes = $3,
                       openings = openings + $4, opened_at = CASE WHEN $4 = 1 THEN now() ELSE opened_at END,
                       next_probe_at = now() + make_interval(secs => $5)
                   WHERE tenant = $1 AND subscription_id = $2
                   RETURNING openings, opened_at, next_probe_at""",
                tenant,
                subscription_id,
                failed_probes,
                int(closed),
                delay,
            )
            assert opened is not None
            queued: Sequence[str] = ()
            if closed:
                data = {
                    "consecutive_failures": row["consecutive_failures"],
                    "last_error": error,
                    "next_probe_at": opened["next_probe_at"].isoformat(),
                }
                event = self._event(
                    tenant,
                    subscription_id,
                    CIRCUIT_OPENED,
                    opened["openings"],
                    opened["opened_at"],
                    source,
                    data,
                    echo,
                )
                _, queued = await self._record(conn, [event])
        await self._wake(queued)
        return delay

    async def _wake(self, subscription_ids: Sequence[str]) -> None:
        if subscription_ids and self._nudge is not None:
            await self._nudge(subscription_ids)

    @staticmethod
    def _event_id(subscription_id: str, opening: int, kind: str) -> str:
        # one id per opening of the circuit: a retry of the same transition is the same event
        return f"circuit/{subscription_id}/{opening}/{kind}"

    @staticmethod
    def _event(
        tenant: str,
        subscription_id: str,
        kind: str,
        opening: int,
        at: datetime,
        source: str | None,
        data: dict[str, Any],
        echo: bool,
    ) -> DomainEvent:
        if echo:
            data = {**data, FROM_CIRCUIT_EVENT: True}
        return DomainEvent(
            event_id=CircuitBreaker._event_id(subscription_id, opening, kind),
            tenant=tenant,
            type=kind,
            occurred_at=at.astimezone(UTC),
            actor="notification",
            source_workflow=source,
            data={"subscription_id": subscription_id, **data},
        )
