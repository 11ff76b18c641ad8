"""The platform's own metrics, as OpenTelemetry instruments exported for Prometheus.

Names follow Prometheus conventions once exported (`fleetflow.readings.stored` with unit
`{reading}` becomes `fleetflow_readings_stored_total`; a histogram in `s` gets `_seconds`).

Three kinds:

- counters of facts, recorded where they happen: readings accepted (API), and the
  outcomes of the service activities that store, analyse and deliver, read off the
  activity's result by `ActivityOutcomes` at the activity boundary (the service's only
  door), so the services themselves stay free of metric code;
- HTTP request durations by route and status, which FastAPI records itself (api/app.py);
- gauges of state (devices by status, open alerts, ingest backlog, dead letters, webhook
  circuits not closed, rollout devices by state), read from PostgreSQL by `StateGauges`
  when /metrics of the API is scraped: they describe the whole platform, so one process
  exports them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from temporalio import activity, client, worker

from fleetflow.contracts.events import DeliveryProgress
from fleetflow.contracts.telemetry import ALERT_CLEARED, ALERT_RAISED, Evaluated, Stored
from fleetflow.db import Pool
from fleetflow.interfaces import activity_name
from fleetflow.interfaces.analytics import AnalyticsActivities
from fleetflow.interfaces.data import DataActivities
from fleetflow.interfaces.notification import NotificationActivities
from fleetflow.interfaces.webhook import WebhookActivities

log = logging.getLogger(__name__)
meter = metrics.get_meter("fleetflow")

# latency buckets in seconds for the Temporal SDK's histograms (the OpenTelemetry
# semantic-convention boundaries, plus 30 s and 60 s for long polls and slow activities)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30, 60)

READINGS_ACCEPTED = meter.create_counter(
    "fleetflow.readings.accepted",
    unit="{reading}",
    description="Readings acknowledged (202) by the API; a repeated batch is not counted again",
)
READINGS_STORED = meter.create_counter(
    "fleetflow.readings.stored", unit="{reading}", description="Readings stored into data.readings"
)
READINGS_QUARANTINED = meter.create_counter(
    "fleetflow.readings.quarantined",
    unit="{reading}",
    description="Readings kept aside because their device may not send",
)
BATCHES_QUARANTINED = meter.create_counter(
    "fleetflow.batches.quarantined",
    unit="{batch}",
    description="Batches set aside because a window step failed the same way on every retry (poison)",
)
ALERTS_RAISED = meter.create_counter("fleetflow.alerts.raised", unit="{alert}", description="Alerts raised")
ALERTS_CLEARED = meter.create_counter(
    "fleetflow.alerts.cleared", unit="{alert}", description="Alerts cleared"
)
EVENTS_RECORDED = meter.create_counter(
    "fleetflow.events.recorded", unit="{event}", description="Domain events recorded in the event store"
)
WEBHOOKS_DELIVERED = meter.create_counter(
    "fleetflow.webhooks.delivered", unit="{delivery}", description="Webhook deliveries answered with 2xx"
)
WEBHOOKS_DEAD_LETTERED = meter.create_counter(
    "fleetflow.webhooks.dead_lettered",
    unit="{delivery}",
    description="Webhook deliveries given up after their last attempt (now dead letters)",
)
REQUESTS_THROTTLED = meter.create_counter(
    "fleetflow.requests.throttled",
    unit="{request}",
    description="Requests refused by a tenant's limits (429 a rate, 403 a count), by tenant and reason",
)


def _stored(result: Any) -> None:
    if isinstance(result, Stored):
        READINGS_STORED.add(result.stored)
        READINGS_QUARANTINED.add(result.quarantined)


def _evaluated(result: Any) -> None:
    if isinstance(result, Evaluated):
        raised = result.raised or sum(1 for e in result.events if e.type == ALERT_RAISED)
        cleared = result.cleared or sum(1 for e in result.events if e.type == ALERT_CLEARED)
        ALERTS_RAISED.add(raised)
        ALERTS_CLEARED.add(cleared)


def _recorded(result: Any) -> None:
    if isinstance(result, int):
        EVENTS_RECORDED.add(result)


def _delivered(result: Any) -> None:
    if isinstance(result, DeliveryProgress):
        WEBHOOKS_DELIVERED.add(result.delivered)
        WEBHOOKS_DEAD_LETTERED.add(result.dead_lettered)


# activity (named by its interface method) -> what its result counts. A retry after a completion
# that never reached the server returns the stored result again and counts it twice: rare, and
# the tables (data.windows, analytics.windows) stay the exact ledger.
OUTCOMES: dict[str, Callable[[Any], None]] = {
    activity_name(DataActivities.store_window): _stored,
    activity_name(AnalyticsActivities.evaluate): _evaluated,
    activity_name(NotificationActivities.record_events): _recorded,
    activity_name(NotificationActivities.record_window_events): _recorded,
    activity_name(WebhookActivities.deliver_pending): _delivered,
}


class ActivityOutcomes(client.Interceptor, worker.Interceptor):
    """Worker interceptor (given to the client, so every worker on it gets it): counts what
    the service activities in OUTCOMES report."""

    def intercept_activity(
        self, next: worker.ActivityInboundInterceptor
    ) -> worker.ActivityInboundInterceptor:
        """Wrap every activity; only the ones in OUTCOMES are counted."""
        return _CountOutcomes(next)


class _CountOutcomes(worker.ActivityInboundInterceptor):
    async def execute_activity(self, input: worker.ExecuteActivityInput) -> Any:
        result = await super().execute_activity(input)
        count = OUTCOMES.get(activity.info().activity_type)
        if count is not None:
            try:
                count(result)
            except Exception:  # a metric must never fail the activity
                log.exception("could not count the outcome of an activity")
        return result


@dataclass(frozen=True)
class StateGauge:
    """A gauge read from the database: `sql` returns rows of (label value, count), or one
    row of (count) when label is None."""

    name: str
    unit: str
    description: str
    label: str | None
    sql: str


class StateGauges:
    """Gauges of state of one process, refreshed from the database on demand; each service
    declares its own (`GAUGES` of its read facade, cheap: they run at every scrape of the
    API, at most every MIN_REFRESH_S)."""

    MIN_REFRESH_S = 5.0

    def __init__(self, gauges: Iterable[StateGauge]) -> None:
        self._values: dict[str, list[tuple[dict[str, str], float]]] = {}
        self._gauges = tuple(gauges)
        self._refreshed = 0.0
        self._lock = asyncio.Lock()
        for gauge in self._gauges:
            meter.create_observable_gauge(
                gauge.name, [self._callback(gauge.name)], unit=gauge.unit, description=gauge.description
            )

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, labels) for labels, value in self._values.get(name, [])]

        return observe

    async def refresh(self, pool: Pool, timeout_s: float = 2.0) -> None:
        """Re-read every gauge unless that was done in the last MIN_REFRESH_S; a failing
        query keeps its last values (and is logged)."""
        async with self._lock:
            if time.monotonic() - self._refreshed < self.MIN_REFRESH_S:
                return
            self._refreshed = time.monotonic()
            for gauge in self._gauges:
                try:
                    async with asyncio.timeout(timeout_s):
                        rows = await pool.fetch(gauge.sql)
                except Exception as exc:  # e.g. a schema not migrated yet: the other gauges go on
                    log.warning("gauge %s not refreshed: %s: %s", gauge.name, type(exc).__name__, exc)
                    continue
                if gauge.label is None:
                    self._values[gauge.name] = [({}, float(rows[0][0]))] if rows else []
                else:
                    self._values[gauge.name] = [({gauge.label: str(r[0])}, float(r[1])) for r in rows]
