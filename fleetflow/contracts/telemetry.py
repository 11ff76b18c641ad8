"""Contracts of telemetry ingestion: the batch the data service accepts, the ingestion windows,
analytics rules, and what the data service answers. The API's body and answer of
`POST /v1/telemetry` are in `api/models/telemetry.py`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, ConfigDict, Field, StringConstraints, model_validator
from typing_extensions import TypedDict

from fleetflow.contracts.common import Contract, DomainEvent

# the bounds of telemetry are defined in limits; they stay importable from here
from fleetflow.contracts.limits import FUTURE_TOLERANCE_S as FUTURE_TOLERANCE_S
from fleetflow.contracts.limits import MAX_ABS_VALUE as MAX_ABS_VALUE
from fleetflow.contracts.limits import MAX_AGE_DAYS as MAX_AGE_DAYS
from fleetflow.contracts.limits import MAX_BATCH_BYTES as MAX_BATCH_BYTES
from fleetflow.contracts.limits import MAX_BATCH_READINGS as MAX_BATCH_READINGS
from fleetflow.contracts.limits import BatchId as BatchId
from fleetflow.contracts.limits import DeviceId, DeviceTypeName, RuleId, RuleParam
from fleetflow.contracts.limits import Metric as Metric
from fleetflow.contracts.limits import Value as Value

# a window's payload bytes: what store_window holds in memory and its time bound scale with it
MAX_WINDOW_BYTES = 16 * 1024 * 1024
# a window that holds fewer readings than its fill target keeps claiming its shard's batches
# for up to FILL_MS after its first claim: at a trickle a shard runs a few full windows a
# second, not one per batch; under load the first claim already reaches the target
FILL_MS = 500
# with adaptive fill (the workflow's ADAPTIVE_FILL patch) a window nothing waits on fills for
# up to IDLE_FILL_MS at a trickle; one holding a reading a rate or zscore rule watches returns
# at once (a threshold rule's alert does not wait on windows: api/early_alerts.py)
IDLE_FILL_MS = 3000
FILL_SHARE = 50  # the default fill target: max_readings / FILL_SHARE (1,000 of 50,000)
POISON = "PoisonWindow"  # ApplicationError type: a window step failing the same way on retry
BUCKETS = 1024  # a batch's bucket; the shard that processes it is bucket % shards

TELEMETRY_STORED = "TelemetryStored"
ALERT_RAISED = "AlertRaised"
ALERT_CLEARED = "AlertCleared"
ALERT_ACKNOWLEDGED = "AlertAcknowledged"
SEVERITIES = ("critical", "major", "minor", "warning", "info")
Severity = Literal["critical", "major", "minor", "warning", "info"]
COMMENT_MAX_CHARS = 1000  # an acknowledgement's or clearance's comment
AlertStatus = Literal["open", "acknowledged", "cleared"]
BATCH_QUARANTINED = "BatchQuarantined"
ANALYSIS_FAILED = "AnalysisFailed"


class ReadingDict(TypedDict):
    """A reading of an accepted batch: the checks of the API's `Reading`, validated without
    building model objects (the ingest hot path: about 40% less CPU per reading)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    device_id: DeviceId
    ts: AwareDatetime
    metric: Metric
    value: Value


class TelemetryBatchDict(TypedDict):
    """A batch the data service accepts, as the API validated it (strict, like its body)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    batch_id: BatchId
    readings: Annotated[list[ReadingDict], Field(min_length=1, max_length=MAX_BATCH_READINGS)]


class IngestionInput(Contract):
    """Input of TelemetryIngestion: which shard it drains, and how."""

    shard: Annotated[int, Field(ge=0)]
    shards: Annotated[int, Field(ge=1, le=BUCKETS)]
    max_window_readings: Annotated[int, Field(ge=1)] = 50_000
    max_wait_ms: Annotated[int, Field(ge=10, le=60_000)] = 10_000
    max_window_bytes: Annotated[int, Field(ge=1)] = MAX_WINDOW_BYTES
    windows_per_run: Annotated[int, Field(ge=1, le=1000)] = 200
    windows_done: int = 0
    readings_done: int = 0
    batches_quarantined: int = 0


class ClaimWindow(Contract):
    """Input of `data.claim_window`."""

    window_id: str
    shard: int
    shards: int
    max_readings: int
    max_wait_ms: int
    max_bytes: int = MAX_WINDOW_BYTES
    # defaults, so that the inputs of runs started before them mean the same: 0 is
    # max_readings / FILL_SHARE; fill_ms 0 returns after the first claim, as it used to
    fill_readings: Annotated[int, Field(ge=0)] = 0
    fill_ms: Annotated[int, Field(ge=0, le=10_000)] = FILL_MS  # well within the claim's time bound
    # set: a window holding a reading of a metric its tenant has an enabled rate or zscore rule on
    # waits at most this long to fill (an alert waits on it); None: every window waits fill_ms
    watched_fill_ms: Annotated[int, Field(ge=0, le=10_000)] | None = None

    def fill_target(self) -> int:
        """Readings at which the window stops waiting to fill."""
        return min(self.fill_readings or max(1, self.max_readings // FILL_SHARE), self.max_readings)


class Window(Contract):
    """A set of claimed batches, processed together."""

    window_id: str
    batches: int
    readings: int
    bytes: int = 0
    # of the window's devices, how many may not send, as its claim saw them (None: not looked
    # at - a split's halves, or a claim before this); 0 lets the workflow skip find_unready
    unready: int | None = None


class Unready(Contract):
    """A device whose readings are quarantined, and why."""

    tenant: str
    device_id: str
    reason: str


class WindowRef(Contract):
    """Input of the window activities that need nothing but the window.

    counts_only: the activity keeps its lists (alerts, events) in its tables and answers counts;
    False only for runs recorded before that (their result carried the lists).
    """

    window_id: str
    counts_only: bool = False


class UnreadyDevices(Contract):
    """Output of `device.find_unready`: how many devices of the window may not send. They are
    kept in `device.window_unready` by window id; `devices` is only ever filled in histories
    recorded before that (it grew with the window and passed the payload limit)."""

    devices: list[Unready] = []
    count: int = 0


class StoreWindow(Contract):
    """Input of `data.store_window`."""

    window_id: str
    quarantine: list[Unready] = []  # only in histories before `device.window_unready`
    counts_only: bool = False


class Stored(Contract):
    """Output of `data.store_window`: readings stored and quarantined, per tenant."""

    window_id: str
    stored: int
    quarantined: int
    by_tenant: dict[str, dict[str, int]] = {}  # kept in data.windows; empty when counts_only
    tenants: int = 0


class Evaluated(Contract):
    """Output of `analytics.evaluate`: how many alerts a window raised and cleared, and how many
    series could not be analysed. The events are in `analytics.window_events`; `events` is filled
    only for callers that are not counts_only (histories recorded before that)."""

    events: list[DomainEvent] = []
    raised: int = 0
    cleared: int = 0
    failed: int = 0


class WindowSplit(Contract):
    """Output of `data.split_window`: the two halves a failing window's batches moved into."""

    parts: Annotated[list[Window], Field(max_length=2)]


class QuarantineBatches(Contract):
    """Input of `data.quarantine_batches`: set a poison window's batches aside, with the reason."""

    window_id: str
    reason: Annotated[str, StringConstraints(max_length=2000)]


class BatchesQuarantined(Contract):
    """Output of `data.quarantine_batches`."""

    window_id: str
    batches: int
    readings: int


INGESTION_WORKFLOW = "TelemetryIngestion"
SUPERVISOR_ID = "ingest-supervisor"


def ingestion_id(shard: int) -> str:
    """The business id of a shard's ingestion workflow."""
    return f"ingest-{shard}"


class SuperviseIngestion(Contract):
    """Input of IngestionSupervisor (`ingest-supervisor`) and `data.supervise_ingestion`."""

    shards: Annotated[int, Field(ge=1, le=BUCKETS)]
    interval_s: Annotated[float, Field(ge=0.5, le=3600)] = 10.0
    checks_per_run: Annotated[int, Field(ge=1, le=1000)] = 360


MAX_ORPHANS = 20


class Supervised(Contract):
    """Output of `data.supervise_ingestion`: shard workflows (re)started, batches reclaimed, and
    windows a dead run stored but never finished (analysis, events), for the supervisor to finish."""

    started: int
    reclaimed: int
    orphans: Annotated[list[str], Field(max_length=MAX_ORPHANS)] = []


class QuarantinedBatch(Contract):
    """A batch set aside because storing or checking it failed the same way on every retry."""

    batch_id: str
    readings: int
    reason: str
    quarantined_at: datetime


class IngestionProgress(Contract):
    """Query `progress` of TelemetryIngestion."""

    shard: int
    windows: int
    readings: int
    last_window: str | None
    last_window_readings: int
    batches_quarantined: int = 0


class Rule(Contract):
    """An analytics rule for one metric of one device type of a tenant.

    threshold: params `above` and/or `below`, with `clear_above` / `clear_below` for hysteresis.
    rate: params `max_per_s` (absolute change per second) and `clear_per_s`.
    zscore: params `z` (raise), `clear_z`, `alpha` (EWMA weight), `min_samples`.
    """

    rule_id: RuleId
    device_type: DeviceTypeName
    metric: Metric
    kind: Literal["threshold", "rate", "zscore"]
    params: dict[str, RuleParam]
    enabled: bool = True
    severity: Severity = "major"

    @model_validator(mode="after")
    def _params(self) -> Rule:
        p = self.params
        if self.kind == "threshold":
            if "above" not in p and "below" not in p:
                raise ValueError("a threshold rule needs params.above or params.below")
            if "above" in p and p.get("clear_above", p["above"]) > p["above"]:
                raise ValueError("params.clear_above must not be above params.above")
            if "below" in p and p.get("clear_below", p["below"]) < p["below"]:
                raise ValueError("params.clear_below must not be below params.below")
        elif self.kind == "rate":
            if p.get("max_per_s", 0) <= 0:
                raise ValueError("a rate rule needs params.max_per_s > 0")
        elif p.get("z", 0) <= 0:
            raise ValueError("a zscore rule needs params.z > 0")
        return self


class AlertView(Contract):
    """An alert as the API shows it."""

    alert_id: int
    device_id: str
    rule_id: str
    metric: str
    status: str
    raised_at: datetime
    raised_value: float
    detail: str
    cleared_at: datetime | None
    cleared_value: float | None
    severity: Severity = "major"
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None
    ack_comment: str | None = None
    cleared_by: str | None = None  # None: the rule cleared it (or it is active)
    clear_comment: str | None = None


class AlertAction(Contract):
    """Input of AlertLifecycle and `analytics.act_on_alert`: acknowledge or clear one alert of a
    tenant by hand. action_id (the workflow's id and run) makes a retried step harmless."""

    tenant: str
    alert_id: int
    action: Literal["acknowledge", "clear"]
    actor: str
    comment: Annotated[str, StringConstraints(max_length=COMMENT_MAX_CHARS)] | None = None
    action_id: str = ""


class AlertActed(Contract):
    """Output of `analytics.act_on_alert` and AlertLifecycle: `done` with the alert and its event,
    `not_found` (no such alert of that tenant) or `conflict` (already acknowledged / cleared)."""

    outcome: Literal["done", "not_found", "conflict"]
    reason: str = ""
    alert: AlertView | None = None
    event: DomainEvent | None = None


class EarlyRaise(Contract):
    """Input of ThresholdAlert and `analytics.raise_early`: one reading of a device that crossed
    a threshold rule when its batch was accepted (the batch's extreme for that rule), so the
    alert is raised without waiting for the reading's window to be stored. window_id (the
    workflow's id and run) keys the step's events, so a retry records nothing twice."""

    tenant: str
    device_id: str
    rule_id: str
    ts: datetime
    value: float
    window_id: str = ""


class QuarantineView(Contract):
    """Quarantined readings of one device, counted by reason."""

    device_id: str
    reason: str
    readings: int
    last_ts: datetime


class TelemetryPoint(Contract):
    """A raw reading or a time bucket's aggregate."""

    ts: datetime
    metric: str
    value: float | None = None
    min: float | None = None
    max: float | None = None
    avg: float | None = None
    count: int | None = None


class TelemetrySeries(Contract):
    """Answer of `GET /v1/devices/{id}/telemetry`."""

    device_id: str
    bucket: str | None
    points: list[TelemetryPoint]
