"""The analytics service: rules, rolling series state and alerts; owns the `analytics` schema.

It reads a stored window's per-series aggregates (written by the data service) and the
device types (the device service's read model), never the raw readings.
"""

from __future__ import annotations

from typing import Any

from temporalio import activity

from activities.probe import probe
from fleetflow import rules
from fleetflow.contracts.common import DomainEvent, TaskQueue
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import ALERT_CLEARED, ALERT_RAISED, AlertView, Evaluated, Rule, WindowRef
from fleetflow.db import Pool


def _stats(row: Any) -> rules.WindowStats:
    return rules.WindowStats(
        n=row["n"], mean=row["mean"], var=row["var"], min_value=row["min_value"],
        max_value=row["max_value"], first_ts=row["first_ts"], first_value=row["first_value"],
        last_ts=row["last_ts"], last_value=row["last_value"],
    )  # fmt: skip


def _prior(row: Any) -> rules.SeriesState | None:
    if row["s_n"] is None:
        return None
    return rules.SeriesState(
        n=row["s_n"], mean=row["s_mean"], var=row["s_var"], last_ts=row["s_last_ts"],
        last_value=row["s_last_value"],
    )  # fmt: skip


class AnalyticsService:
    """Activities of the `analytics` task queue, and the rules and alerts read model."""

    queue = TaskQueue.ANALYTICS

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    @activity.defn(name="analytics.ping")
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)

    @activity.defn(name="analytics.evaluate")
    async def evaluate(self, ref: WindowRef) -> Evaluated:
        """Run the tenants' rules over a stored window; raise and clear alerts once each."""
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                "SELECT events FROM analytics.windows WHERE window_id = $1", ref.window_id
            )
            if done is not None:
                return Evaluated(events=[DomainEvent.model_validate(e) for e in done])
            rows = await conn.fetch(
                """SELECT w.*, d.device_type, s.n AS s_n, s.mean AS s_mean, s.var AS s_var,
                          s.last_ts AS s_last_ts, s.last_value AS s_last_value
                   FROM data.window_stats w
                   JOIN device.devices d USING (tenant, device_id)
                   LEFT JOIN analytics.series s USING (tenant, device_id, metric)
                   WHERE w.window_id = $1""",
                ref.window_id,
            )
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
                    "WHERE status = 'open' AND tenant = ANY($1)",
                    tenants,
                )
            }
            events: list[DomainEvent] = []
            series_rows = []
            for row in rows:
                window, prior = _stats(row), _prior(row)
                for rule in by_series.get((row["tenant"], row["device_type"], row["metric"]), []):
                    verdict = rules.evaluate(rule, window, prior)
                    key = (row["tenant"], row["device_id"], rule.rule_id)
                    event = await self._apply(conn, ref.window_id, row, rule, verdict, open_alerts.get(key))
                    if event is not None:
                        events.append(event)
                state = rules.update(prior, window)
                series_rows.append(
                    (row["tenant"], row["device_id"], row["metric"], state.n, state.mean, state.var,
                     state.last_ts, state.last_value)
                )  # fmt: skip
            if series_rows:
                await conn.execute(
                    """INSERT INTO analytics.series AS s
                       SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],
                           $5::float8[], $6::float8[], $7::timestamptz[], $8::float8[])
                       ON CONFLICT (tenant, device_id, metric) DO UPDATE SET n = excluded.n,
                           mean = excluded.mean, var = excluded.var, last_ts = excluded.last_ts,
                           last_value = excluded.last_value""",
                    *map(list, zip(*series_rows, strict=True)),
                )  # fmt: skip
            await conn.execute(
                "INSERT INTO analytics.windows (window_id, events) VALUES ($1, $2)",
                ref.window_id, [e.model_dump(mode="json") for e in events],
            )  # fmt: skip
        return Evaluated(events=events)

    async def _apply(
        self, conn: Any, window_id: str, row: Any, rule: Rule, verdict: rules.Verdict, open_id: int | None
    ) -> DomainEvent | None:
        """Open or clear the alert of (device, rule) as the verdict says; the event, if any."""
        tenant, device_id = row["tenant"], row["device_id"]
        if verdict.decision == "raise" and open_id is None:
            alert_id = await conn.fetchval(
                """INSERT INTO analytics.alerts (tenant, device_id, rule_id, metric, status, raised_at,
                       raised_value, detail)
                   VALUES ($1, $2, $3, $4, 'open', $5, $6, $7)
                   ON CONFLICT (tenant, device_id, rule_id) WHERE status = 'open' DO NOTHING
                   RETURNING alert_id""",
                tenant, device_id, rule.rule_id, rule.metric, row["last_ts"], verdict.value, verdict.detail,
            )  # fmt: skip
            kind = ALERT_RAISED
        elif verdict.decision == "clear" and open_id is not None:
            alert_id = await conn.fetchval(
                """UPDATE analytics.alerts SET status = 'cleared', cleared_at = $2, cleared_value = $3
                   WHERE alert_id = $1 AND status = 'open' RETURNING alert_id""",
                open_id, row["last_ts"], verdict.value,
            )  # fmt: skip
            kind = ALERT_CLEARED
        else:
            return None
        if alert_id is None:
            return None
        return DomainEvent(
            event_id=f"{window_id}/{tenant}/{device_id}/{rule.rule_id}/{kind}", tenant=tenant,
            device_id=device_id, type=kind, occurred_at=row["last_ts"], actor="analytics",
            data={"alert_id": alert_id, "rule_id": rule.rule_id, "metric": rule.metric,
                  "value": verdict.value, "detail": verdict.detail},
        )  # fmt: skip

    # --- read model ------------------------------------------------------------

    async def put_rule(self, tenant: str, rule: Rule) -> None:
        """Create or replace a rule."""
        await self.pool.execute(
            """INSERT INTO analytics.rules (tenant, rule_id, device_type, metric, kind, params, enabled)
               VALUES ($1, $2, $3, $4, $5, $6, $7)
               ON CONFLICT (tenant, rule_id) DO UPDATE SET device_type = $3, metric = $4, kind = $5,
                   params = $6, enabled = $7""",
            tenant, rule.rule_id, rule.device_type, rule.metric, rule.kind, rule.params, rule.enabled,
        )  # fmt: skip

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
        self, tenant: str, *, status: str | None, device_id: str | None, limit: int
    ) -> list[AlertView]:
        """A tenant's alerts, newest first."""
        rows = await self.pool.fetch(
            """SELECT * FROM analytics.alerts WHERE tenant = $1 AND ($2::text IS NULL OR status = $2)
                 AND ($3::text IS NULL OR device_id = $3) ORDER BY alert_id DESC LIMIT $4""",
            tenant, status, device_id, limit,
        )  # fmt: skip
        return [AlertView.model_validate({k: r[k] for k in AlertView.model_fields}) for r in rows]
