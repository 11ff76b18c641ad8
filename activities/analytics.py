"""The analytics service: rules, rolling series state and alerts; owns the `analytics` schema.

It reads a stored window's per-series aggregates and the device types through the data and
device services' read facades (activities/data_facade.py, device_facade.py), never their
tables or the raw readings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from activities import data_facade, device_facade
from activities.poison import in_last_resort, poison_guard, reason_of
from activities.probe import probe
from fleetflow import rules
from fleetflow.contracts.common import DomainEvent, TaskQueue
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import (
    ALERT_ACKNOWLEDGED,
    ALERT_CLEARED,
    ALERT_RAISED,
    ANALYSIS_FAILED,
    AlertActed,
    AlertAction,
    AlertView,
    EarlyRaise,
    Evaluated,
    Rule,
    WindowRef,
)
from fleetflow.db import Pool
from fleetflow.interfaces import implements
from fleetflow.interfaces.analytics import AnalyticsActivities


def _aware(ts: datetime) -> datetime:
    """asyncpg answers a naive datetime.min/max for timestamps Python cannot hold."""
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _stats(row: Any) -> rules.WindowStats:
    return rules.WindowStats(
        n=row["n"],
        mean=row["mean"],
        var=row["var"],
        min_value=row["min_value"],
        max_value=row["max_value"],
        first_ts=_aware(row["first_ts"]),
        first_value=row["first_value"],
        last_ts=_aware(row["last_ts"]),
        last_value=row["last_value"],
    )


def _prior(row: Any) -> rules.SeriesState | None:
    if row["s_n"] is None:
        return None
    return rules.SeriesState(
        n=row["s_n"],
        mean=row["s_mean"],
        var=row["s_var"],
        last_ts=_aware(row["s_last_ts"]),
        last_value=row["s_last_value"],
    )


def _evaluated(ref: WindowRef, events: list[DomainEvent]) -> Evaluated:
    return Evaluated(
        events=[] if ref.counts_only else events,
        raised=sum(1 for e in events if e.type == ALERT_RAISED),
        cleared=sum(1 for e in events if e.type == ALERT_CLEARED),
        failed=sum(1 for e in events if e.type == ANALYSIS_FAILED),
    )


def _analysis_failed(window_id: str, row: Any, exc: BaseException) -> DomainEvent:
    """The event of a series the rules could not evaluate in this window."""
    tenant, device_id, metric = row["tenant"], row["device_id"], row["metric"]
    return DomainEvent(
        event_id=f"{window_id}/{tenant}/{device_id}/{metric}/{ANALYSIS_FAILED}",
        tenant=tenant,
        device_id=device_id,
        type=ANALYSIS_FAILED,
        occurred_at=datetime.now(UTC),
        actor="analytics",
        data={"window_id": window_id, "metric": metric, "reason": reason_of(exc)},
    )


def _rolled(row: _Series) -> rules.StateTuple:
    """rules.update of a series' prior state by its window, read straight off the records."""
    w, p = row.stats, row.prior
    last = (w["n"], w["mean"], w["var"], _aware(w["last_ts"]), w["last_value"])
    if p is None:
        return last
    return rules.updated((p["n"], p["mean"], p["var"], _aware(p["last_ts"]), p["last_value"]), last)


class _Series:
    """A window's row of one series read as one mapping: the aggregates by their names, the
    device type as `device_type`, the prior state as `s_<name>` (None for a new series)."""

    __slots__ = ("device_type", "prior", "stats")

    def __init__(self, stats: Any, device_type: str, prior: Any) -> None:
        self.stats, self.device_type, self.prior = stats, device_type, prior

    def __getitem__(self, key: str) -> Any:
        if key == "device_type":
            return self.device_type
        if key.startswith("s_"):
            return None if self.prior is None else self.prior[key[2:]]
        return self.stats[key]


# a window's raise: not again for a reading the early path raised already (its alert, raised
# ahead of the windows from a reading of this window, was cleared by hand meanwhile); the
# guard reads that rule's alerts of the device by index (alerts_rule_raised), not each alert
# the device ever had
RAISE_SQL = """INSERT INTO analytics.alerts (tenant, device_id, rule_id, metric, status, raised_at,
       raised_value, detail, severity)
   SELECT $1::text, $2::text, $3::text, $4::text, 'open', $5::timestamptz,
       $6::float8, $7::text, $8::text
   WHERE NOT EXISTS (SELECT 1 FROM analytics.alerts WHERE tenant = $1
       AND device_id = $2 AND rule_id = $3 AND raised_at <= $5
       AND raised_at > coalesce($9::timestamptz, '-infinity'))
   ON CONFLICT (tenant, device_id, rule_id) WHERE status <> 'cleared' DO NOTHING
   RETURNING alert_id"""


class AnalyticsService(AnalyticsActivities):
    """Activities of the `analytics` task queue, and the rules and alerts read model."""

    queue = TaskQueue.ANALYTICS

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    @implements(AnalyticsActivities.ping)
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)

    @implements(AnalyticsActivities.evaluate)
    async def evaluate(self, ref: WindowRef) -> Evaluated:
        """Run the tenants' rules over a stored window; raise and clear alerts once each. The
        window's events go to analytics.window_events (the notification service records them).

        From the last-resort attempt on, a series whose rules fail (a value or time the rules
        cannot compute with) is skipped with an `AnalysisFailed` event instead of failing the
        whole window again.
        """
        async with poison_guard(), self.pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval("SELECT 1 FROM analytics.windows WHERE window_id = $1", ref.window_id)
            if done is not None:
                stored = await conn.fetch(
                    """SELECT event FROM analytics.window_events WHERE window_id = $1
                       ORDER BY tenant, event_id""",
                    ref.window_id,
                )
                return _evaluated(ref, [DomainEvent.model_validate(r["event"]) for r in stored])
            rows = await self._window_series(conn, ref.window_id)
            tenants = sorted({r["tenant"] for r in rows})
            by_series: dict[tuple[str, str, str], list[Rule]] = {}
            for r in await conn.fetch(
                "SELECT * FROM analytics.rules WHERE enabled AND tenant = ANY($1)", tenants
            ):
                rule = Rule.model_validate({k: r[k] for k in Rule.model_fields})
                by_series.setdefault((r["tenant"], rule.device_type, rule.metric), []).append(rule)
            open_alerts = {
                (a["tenant"], a["device_id"], a["rule_id"]): a["alert_id"]
                for a in await conn.fetch(
                    "SELECT tenant, device_id, rule_id, alert_id FROM analytics.alerts "
                    "WHERE status <> 'cleared' AND tenant = ANY($1)",
                    tenants,
                )
            }
            events: list[DomainEvent] = []
            series_rows = []
            isolate = in_last_resort()
            for row in rows:
                w, tenant = row.stats, row.stats["tenant"]
                series_rules = by_series.get((tenant, row.device_type, w["metric"]))
                if not series_rules:
                    # most series: no rule to evaluate, only the state to roll on, on tuples
                    try:
                        series_rows.append((tenant, w["device_id"], w["metric"], *_rolled(row)))
                    except (ArithmeticError, TypeError, ValueError) as exc:
                        if not isolate:
                            raise
                        events.append(_analysis_failed(ref.window_id, row, exc))
                    continue
                window, prior = _stats(row), _prior(row)
                try:
                    verdicts = [(rule, rules.evaluate(rule, window, prior)) for rule in series_rules]
                    state = rules.update(prior, window)
                except (ArithmeticError, TypeError, ValueError) as exc:
                    if not isolate:
                        raise
                    events.append(_analysis_failed(ref.window_id, row, exc))
                    continue
                for rule, verdict in verdicts:
                    key = (row["tenant"], row["device_id"], rule.rule_id)
                    event = await self._apply(
                        conn, ref.window_id, row, rule, verdict, open_alerts.get(key), seen=row["s_last_ts"]
                    )
                    if event is not None:
                        events.append(event)
                series_rows.append(
                    (
                        row["tenant"],
                        row["device_id"],
                        row["metric"],
                        state.n,
                        state.mean,
                        state.var,
                        state.last_ts,
                        state.last_value,
                    )
                )
            if series_rows:
                await conn.execute(
                    """INSERT INTO analytics.series AS s
                       SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],
                           $5::float8[], $6::float8[], $7::timestamptz[], $8::float8[])
                       ON CONFLICT (tenant, device_id, metric) DO UPDATE SET n = excluded.n,
                           mean = excluded.mean, var = excluded.var, last_ts = excluded.last_ts,
                           last_value = excluded.last_value""",
                    *map(list, zip(*series_rows, strict=True)),
                )
            await conn.execute(
                """INSERT INTO analytics.window_events (window_id, tenant, event_id, event)
                   SELECT $1, * FROM unnest($2::text[], $3::text[], $4::jsonb[])""",
                ref.window_id,
                [e.tenant for e in events],
                [e.event_id for e in events],
                [e.model_dump(mode="json") for e in events],
            )
            await conn.execute(
                "INSERT INTO analytics.windows (window_id, events) VALUES ($1, '[]')", ref.window_id
            )
        return _evaluated(ref, events)

    @implements(AnalyticsActivities.raise_early)
    async def raise_early(self, request: EarlyRaise) -> int:
        """Raise the alert of one device and threshold rule for a reading that crossed it when
        its batch was accepted, unless the device or rule no longer allows it or an alert of
        theirs still holds; its event goes to analytics.window_events under the request's
        window_id (the notification service records it). How many events: 0 or 1. Done once.

        The window that stores the reading finds the alert open and raises nothing again."""
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                "SELECT 1 FROM analytics.windows WHERE window_id = $1", request.window_id
            )
            if done is not None:
                return int(
                    await conn.fetchval(
                        "SELECT count(*) FROM analytics.window_events WHERE window_id = $1",
                        request.window_id,
                    )
                )
            event = await self._early_event(conn, request)
            if event is not None:
                await conn.execute(
                    """INSERT INTO analytics.window_events (window_id, tenant, event_id, event)
                       VALUES ($1, $2, $3, $4)""",
                    request.window_id,
                    event.tenant,
                    event.event_id,
                    event.model_dump(mode="json"),
                )
            await conn.execute(
                "INSERT INTO analytics.windows (window_id, events) VALUES ($1, '[]')", request.window_id
            )
        return 0 if event is None else 1

    async def _early_event(self, conn: Any, request: EarlyRaise) -> DomainEvent | None:
        """The AlertRaised event of request, if the rule (still enabled, a threshold on the
        device's type) raises on its reading and the device may send; None otherwise."""
        device = (request.tenant, request.device_id)
        # an active device only: another's window quarantines the reading, no rule sees it
        types = await device_facade.active_device_types(conn, [device])
        if device not in types:
            return None
        # the rule and how far the windows got on its series, in one round trip
        row = await conn.fetchrow(
            """SELECT r.*, s.last_ts AS seen FROM analytics.rules r
               LEFT JOIN analytics.series s
                 ON s.tenant = r.tenant AND s.device_id = $3 AND s.metric = r.metric
               WHERE r.tenant = $1 AND r.rule_id = $2 AND r.enabled AND r.kind = 'threshold'""",
            request.tenant,
            request.rule_id,
            request.device_id,
        )
        if row is None:
            return None
        rule = Rule.model_validate({k: row[k] for k in Rule.model_fields})
        if rule.device_type != types[device]:
            return None
        seen = row["seen"]
        if seen is not None and _aware(seen) >= request.ts:
            return None  # the windows got there first: what they decided stands
        reading = rules.WindowStats(
            n=1,
            mean=request.value,
            var=0.0,
            min_value=request.value,
            max_value=request.value,
            first_ts=request.ts,
            first_value=request.value,
            last_ts=request.ts,
            last_value=request.value,
        )
        verdict = rules.evaluate(rule, reading, None)
        if verdict.decision != "raise":
            return None
        series = {"tenant": request.tenant, "device_id": request.device_id, "last_ts": request.ts}
        return await self._apply(conn, request.window_id, series, rule, verdict, None, seen=request.ts)

    async def _window_series(self, conn: Any, window_id: str) -> list[_Series]:
        """The window's aggregates (data service) of registered devices, with their device type
        (device service) and the series' prior state: three queries whatever the number of
        series."""
        stats = await data_facade.window_stats(conn, window_id)
        types = await device_facade.device_types(conn, list({(w["tenant"], w["device_id"]) for w in stats}))
        stats = [w for w in stats if (w["tenant"], w["device_id"]) in types]
        prior = {
            (r["tenant"], r["device_id"], r["metric"]): r
            for r in await conn.fetch(
                """SELECT s.* FROM unnest($1::text[], $2::text[], $3::text[]) AS k(tenant, device_id, metric)
                   JOIN analytics.series s USING (tenant, device_id, metric)""",
                [w["tenant"] for w in stats],
                [w["device_id"] for w in stats],
                [w["metric"] for w in stats],
            )
        }
        return [
            _Series(
                w, types[(w["tenant"], w["device_id"])], prior.get((w["tenant"], w["device_id"], w["metric"]))
            )
            for w in stats
        ]

    async def _apply(
        self,
        conn: Any,
        window_id: str,
        row: Any,
        rule: Rule,
        verdict: rules.Verdict,
        open_id: int | None,
        *,
        seen: datetime | None,
    ) -> DomainEvent | None:
        """Open or clear the alert of (device, rule) as the verdict says; the event, if any.
        `seen`: the series' latest reading the windows had analysed before row (None: none)."""
        tenant, device_id = row["tenant"], row["device_id"]
        if verdict.decision == "raise" and open_id is None:
            alert_id = await conn.fetchval(
                RAISE_SQL,
                tenant,
                device_id,
                rule.rule_id,
                rule.metric,
                row["last_ts"],
                verdict.value,
                verdict.detail,
                rule.severity,
                seen,
            )
            kind = ALERT_RAISED
        elif verdict.decision == "clear" and open_id is not None:
            alert_id = await conn.fetchval(
                # not by a window older than the reading that raised it while the windows have
                # not reached that reading yet (raised as its batch was accepted, ahead of the
                # windows still waiting with older readings); once they have, any window clears
                # it, as ever (a device whose clock was set back, late readings)
                """UPDATE analytics.alerts SET status = 'cleared', cleared_at = $2, cleared_value = $3
                   WHERE alert_id = $1 AND status <> 'cleared'
                     AND (raised_at <= $2 OR raised_at <= $4::timestamptz)
                   RETURNING alert_id""",
                open_id,
                row["last_ts"],
                verdict.value,
                seen,
            )
            kind = ALERT_CLEARED
        else:
            return None
        if alert_id is None:
            return None
        return DomainEvent(
            event_id=f"{window_id}/{tenant}/{device_id}/{rule.rule_id}/{kind}",
            tenant=tenant,
            device_id=device_id,
            type=kind,
            occurred_at=row["last_ts"],
            actor="analytics",
            data={
                "alert_id": alert_id,
                "rule_id": rule.rule_id,
                "metric": rule.metric,
                "severity": rule.severity,
                "value": verdict.value,
                "detail": verdict.detail,
            },
        )

    # --- read model ------------------------------------------------------------

    async def put_rule(self, tenant: str, rule: Rule) -> None:
        """Create or replace a rule."""
        await self.pool.execute(
            """INSERT INTO analytics.rules (tenant, rule_id, device_type, metric, kind, params, enabled,
                   severity)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (tenant, rule_id) DO UPDATE SET device_type = $3, metric = $4, kind = $5,
                   params = $6, enabled = $7, severity = $8""",
            tenant,
            rule.rule_id,
            rule.device_type,
            rule.metric,
            rule.kind,
            rule.params,
            rule.enabled,
            rule.severity,
        )

    async def list_rules(self, tenant: str) -> list[Rule]:
        """A tenant's rules."""
        rows = await self.pool.fetch(
            "SELECT * FROM analytics.rules WHERE tenant = $1 ORDER BY rule_id", tenant
        )
        return [Rule.model_validate({k: r[k] for k in Rule.model_fields}) for r in rows]

    async def delete_rule(self, tenant: str, rule_id: str) -> bool:
        """Remove a rule; False when there was none."""
        result = await self.pool.execute(
            "DELETE FROM analytics.rules WHERE tenant = $1 AND rule_id = $2", tenant, rule_id
        )
        return str(result) != "DELETE 0"

    async def list_alerts(
        self,
        tenant: str,
        *,
        status: str | None,
        device_id: str | None,
        limit: int,
        severity: str | None = None,
        before: int | None = None,
    ) -> list[AlertView]:
        """A tenant's alerts, newest first; `before` pages on (alerts older than that id).
        `status` `active` is `open` or `acknowledged`."""
        rows = await self.pool.fetch(
            """SELECT * FROM analytics.alerts WHERE tenant = $1
                 AND ($2::text IS NULL OR status = $2 OR ($2 = 'active' AND status <> 'cleared'))
                 AND ($3::text IS NULL OR device_id = $3) AND ($5::text IS NULL OR severity = $5)
                 AND ($6::bigint IS NULL OR alert_id < $6)
               ORDER BY alert_id DESC LIMIT $4""",
            tenant,
            status,
            device_id,
            limit,
            severity,
            before,
        )
        return [_alert_view(r) for r in rows]

    @implements(AnalyticsActivities.act_on_alert)
    async def act_on_alert(self, request: AlertAction) -> AlertActed:
        """Acknowledge or clear one of the tenant's alerts by hand; the event to record with it.
        Done once: a retry of the same action answers the same, another action on an alert
        already acknowledged (or cleared) is a conflict."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM analytics.alerts WHERE tenant = $1 AND alert_id = $2 FOR UPDATE",
                request.tenant,
                request.alert_id,
            )
            if row is None:
                return AlertActed(outcome="not_found", reason=f"alert {request.alert_id} not found")
            if request.action_id and request.action_id in row["action_ids"]:
                return AlertActed(outcome="done", alert=_alert_view(row), event=_acted(request, row))
            if row["status"] == "cleared":
                return AlertActed(outcome="conflict", reason=f"alert {request.alert_id} is cleared already")
            if request.action == "acknowledge":
                if row["status"] == "acknowledged":
                    return AlertActed(
                        outcome="conflict",
                        reason=f"alert {request.alert_id} was acknowledged by {row['acknowledged_by']}",
                    )
                row = await conn.fetchrow(
                    """UPDATE analytics.alerts SET status = 'acknowledged', acknowledged_at = now(),
                           acknowledged_by = $2, ack_comment = $3, action_ids = action_ids || $4::text
                       WHERE alert_id = $1 RETURNING *""",
                    request.alert_id,
                    request.actor,
                    request.comment,
                    request.action_id,
                )
            else:
                # an acknowledgement, if any, stays on the record (ThingsBoard's cleared+acked)
                row = await conn.fetchrow(
                    """UPDATE analytics.alerts SET status = 'cleared', cleared_at = now(),
                           cleared_by = $2, clear_comment = $3, action_ids = action_ids || $4::text
                       WHERE alert_id = $1 RETURNING *""",
                    request.alert_id,
                    request.actor,
                    request.comment,
                    request.action_id,
                )
        return AlertActed(outcome="done", alert=_alert_view(row), event=_acted(request, row))


def _alert_view(row: Any) -> AlertView:
    return AlertView.model_validate({k: row[k] for k in AlertView.model_fields})


def _acted(request: AlertAction, row: Any) -> DomainEvent:
    """The event of a hand acknowledgement or clearance (its id names the tenant and alert)."""
    kind = ALERT_ACKNOWLEDGED if request.action == "acknowledge" else ALERT_CLEARED
    at = row["acknowledged_at"] if request.action == "acknowledge" else row["cleared_at"]
    return DomainEvent(
        event_id=f"{request.tenant}/alerts/{request.alert_id}/{kind}/by-hand",
        tenant=request.tenant,
        device_id=row["device_id"],
        type=kind,
        occurred_at=at,
        actor=request.actor,
        data={
            "alert_id": request.alert_id,
            "rule_id": row["rule_id"],
            "metric": row["metric"],
            "severity": row["severity"],
            "by_hand": True,
            "comment": request.comment,
        },
    )
