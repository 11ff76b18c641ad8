"""Threshold rules checked as a batch is accepted, so an alert does not wait for its window.

A window is stored behind its shard's backlog (seconds at saturation, a window or two at any
load); a threshold rule needs nothing of the series' past, so a reading that crosses one is
known to raise as soon as it is accepted. For such a reading, while no alert of that device
and rule holds, the API starts ThresholdAlert (workflows/threshold_alert.py) before it answers
202: the alert is raised durably, whatever becomes of the API. The window that stores the
reading finds the alert open and raises nothing again (one alert per device and rule).

Best effort on top of the windows: a rule is seen here up to RULES_TTL_S after it changes (at
once by the API process that changed it), at most EARLY_PER_BATCH alerts a batch start early,
and a failure here only leaves the alert to the window; none of it can fail the acceptance of
the batch, a batch waits for its check at most EARLY_START_TIMEOUT_S, and a (device, rule)
looked at is left alone NOT_DUE_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from activities import analytics_facade, device_facade
from activities.telemetry_accept import ReadingColumns
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.telemetry import EarlyRaise
from fleetflow.db import Pool
from fleetflow.identity import acting_for
from fleetflow.security import ServiceActor
from fleetflow.single_flight import SingleFlight
from fleetflow.temporal import device_search_attributes
from workflows.threshold_alert import ThresholdAlert, threshold_alert_id

log = logging.getLogger(__name__)

RULES_TTL_S = 1.0  # how long a tenant's threshold rules are kept in this process
MAX_TENANTS = 10_000  # tenants whose rules this process keeps (least recently read go)
MAX_CACHED_RULES = 200_000  # rules this process keeps, all tenants together
EARLY_PER_BATCH = 50  # alerts one batch may start early; the windows raise the rest
# (device, rule) pairs of one batch looked at: a 10,000-reading batch over 10,000 devices, each
# crossing a tenant's 1,000 rules, would be 10 million (seconds of the event loop, gigabytes)
MAX_CANDIDATES = 20 * EARLY_PER_BATCH
# how long a batch's 202 waits for its check, the reads and the starts: its readings are
# committed, and the window raises whatever did not start (the SDK alone retries an unavailable
# frontend ~10 s; a read waits up to the pool's 10 s for a connection, then its 60 s)
EARLY_START_TIMEOUT_S = 2.0
# a tenant's early starts, per process: each is a workflow, where a window raises its alerts in
# one activity; in an alert storm (every device hot at once) the windows raise the rest
EARLY_PER_TENANT_S = 10
EARLY_BURST = 2 * EARLY_PER_BATCH
# a (device, rule) found not to start (its alert holds, the device is not of the rule's type or
# not active, the windows are ahead) or started is not looked at again for this long: a device
# staying hot crossed its rule in every batch (publish), and each such check cost three queries,
# the budget given back (nothing started); an alert cleared and crossed again meanwhile is
# raised by its window
NOT_DUE_S = 10.0
MAX_NOT_DUE = 100_000  # such pairs this process keeps, all tenants together


@dataclass(frozen=True)
class Threshold:
    """One enabled threshold rule of a tenant, as the check needs it."""

    rule_id: str
    device_type: str
    metric: str
    above: float | None
    below: float | None


@dataclass(frozen=True)
class MetricRules:
    """One metric's threshold rules, sorted by bound so that the rules a reading crosses are
    found by bisection, not by a comparison with each rule."""

    above: list[Threshold]  # the rules with `above`, by it
    aboves: list[float]
    below: list[Threshold]  # the rules with `below`, by it
    belows: list[float]
    device_types: dict[str, str]  # rule id -> device type
    metric: str


Rules = dict[str, MetricRules]  # metric -> its rules


def index_rules(thresholds: Iterable[Threshold]) -> Rules:
    """The rules by metric, each metric's sorted by bound."""
    by_metric: dict[str, list[Threshold]] = {}
    for t in thresholds:
        by_metric.setdefault(t.metric, []).append(t)
    indexed: Rules = {}
    for metric, ts in by_metric.items():
        above = sorted((t for t in ts if t.above is not None), key=lambda t: t.above or 0.0)
        below = sorted((t for t in ts if t.below is not None), key=lambda t: t.below or 0.0)
        indexed[metric] = MetricRules(
            above,
            [t.above for t in above if t.above is not None],
            below,
            [t.below for t in below if t.below is not None],
            {t.rule_id: t.device_type for t in ts},
            metric,
        )
    return indexed


@dataclass
class _Extremes:
    """The highest and lowest reading of one device's metric in a batch, with their times."""

    high: float
    high_ts: datetime
    low: float
    low_ts: datetime


Crossing = tuple[datetime, float]  # the ts and value of the reading that raises


def crossings(
    batch: ReadingColumns, rules: Rules, limit: int = MAX_CANDIDATES
) -> dict[tuple[str, str], Crossing]:
    """(device id, rule id) -> the reading of the batch that raises that rule for that device (the
    highest above `above`, else the lowest below `below`, as a window's max and min would), at
    most `limit` of them; the device's type is not checked here."""
    extremes: dict[tuple[str, str], _Extremes] = {}
    readings = zip(batch.device_ids, batch.metrics, batch.ts, batch.values, strict=True)
    for device_id, metric, ts, value in readings:
        if metric not in rules:
            continue
        seen = extremes.get((device_id, metric))
        if seen is None:
            extremes[(device_id, metric)] = _Extremes(value, ts, value, ts)
            continue
        if value > seen.high:
            seen.high, seen.high_ts = value, ts
        if value < seen.low:
            seen.low, seen.low_ts = value, ts
    found: dict[tuple[str, str], Crossing] = {}
    for (device_id, metric), e in extremes.items():
        m = rules[metric]
        for i in range(bisect_left(m.aboves, e.high)):  # above < high
            found[(device_id, m.above[i].rule_id)] = (e.high_ts, e.high)
            if len(found) >= limit:
                return found
        for i in range(bisect_right(m.belows, e.low), len(m.below)):  # below > low
            found.setdefault((device_id, m.below[i].rule_id), (e.low_ts, e.low))
            if len(found) >= limit:
                return found
    return found


def _before(seen: datetime | None, ts: datetime) -> bool:
    """Whether the windows' latest reading of a series (None: none yet) is older than ts."""
    return seen is None or (seen if seen.tzinfo is not None else seen.replace(tzinfo=UTC)) < ts


@dataclass(frozen=True)
class Plan:
    """What an early check found due for an accepted batch: the raises to start, and the
    (device, rule) pairs it looked at (which rest NOT_DUE_S)."""

    tenant: str
    starts: list[EarlyRaise] = field(default_factory=list)
    rested: list[tuple[str, str]] = field(default_factory=list)


class EarlyAlerts:
    """The API process's check of accepted batches against its tenants' threshold rules."""

    def __init__(self, pool: Pool, temporal: Client) -> None:
        self.pool, self.temporal = pool, temporal
        # tenant -> (when it expires, its rules), in order of expiry
        self._rules: OrderedDict[str, tuple[float, Rules]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._cached = 0
        self._loading: SingleFlight[str, Rules] = SingleFlight()  # tenant -> its rules being read
        self._budgets: dict[str, tuple[float, float]] = {}  # tenant -> (starts left, when)
        # (tenant, device id, rule id) -> until when it is not looked at, in order of expiry
        self._not_due: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._generation: dict[str, int] = {}  # tenant -> its rule changes seen by this process

    async def rules_of(self, tenant: str) -> Rules:
        """metric -> the tenant's enabled threshold rules on it (kept RULES_TTL_S)."""
        now = time.monotonic()
        kept = self._rules.get(tenant)
        if kept is not None and kept[0] > now:
            return kept[1]
        # one read a tenant at a time: the batches (publishes) arriving meanwhile wait for it
        generation = self._generation.get(tenant, 0)
        return await self._loading.run(tenant, lambda: self._load(tenant, now, generation))

    async def _load(self, tenant: str, now: float, generation: int) -> Rules:
        rows = await analytics_facade.threshold_rules(self.pool, tenant)
        rules = index_rules(
            Threshold(
                r["rule_id"],
                r["device_type"],
                r["metric"],
                r["params"].get("above"),
                r["params"].get("below"),
            )
            for r in rows
        )
        if self._generation.get(tenant, 0) != generation:
            return rules  # read before the rules changed: its waiters take it, no later check
        self._forget(tenant)
        self._rules[tenant] = (now + RULES_TTL_S, rules)
        self._sizes[tenant] = len(rows)
        self._cached += len(rows)
        # in order of expiry: what expired, then the oldest, go (an expired entry serves nothing)
        while self._rules:
            oldest, (expires, _) = next(iter(self._rules.items()))
            if expires > now and len(self._rules) <= MAX_TENANTS and self._cached <= MAX_CACHED_RULES:
                break
            self._forget(oldest)
        return rules

    def _forget(self, tenant: str) -> None:
        self._rules.pop(tenant, None)
        self._cached -= self._sizes.pop(tenant, 0)

    @property
    def cached_rules(self) -> int:
        """How many rules this process keeps, all tenants together."""
        return self._cached

    async def check_rows(self, tenant: str, device_id: str, rows: list[str]) -> int:
        """check() for an MQTT publish of a device: its `device_id,metric,ts,value` CSV rows."""
        try:
            # bounded as check() is: each publish of the tenant waits for its rules' one read,
            # and a read waiting for a connection held a task a publish, piling up meanwhile
            async with asyncio.timeout(EARLY_START_TIMEOUT_S):
                rules = await self.rules_of(tenant)
            if not rules:
                return 0
            watched = [row.split(",") for row in rows if row.split(",", 2)[1] in rules]
            if not watched:
                return 0
            batch = ReadingColumns(
                "",
                [w[0] for w in watched],
                [datetime.fromisoformat(w[2]) for w in watched],
                [w[1] for w in watched],
                [float(w[3]) for w in watched],
            )
        except Exception as exc:
            log.warning("early alert check of a publish of %s/%s failed: %s", tenant, device_id, exc)
            return 0
        return await self.check(tenant, batch, f"device:{device_id}")

    def may_watch(self, tenant: str, metrics: Iterable[str] | None = None) -> bool:
        """False when this process knows, fresh, that the tenant has no threshold rule on any of
        `metrics` (none at all, when not given): no check needed; True otherwise."""
        kept = self._rules.get(tenant)
        if kept is None or kept[0] <= time.monotonic():
            return True
        rules = kept[1]
        return bool(rules) and (metrics is None or not rules.keys().isdisjoint(metrics))

    def forget(self, tenant: str) -> None:
        """Drop the tenant's rules (they changed): the next check reads them again."""
        self._forget(tenant)
        self._loading.forget(tenant)  # a read begun before the change is not waited for
        # nor kept when it ends after the change (it has the rules as they were)
        if tenant not in self._generation and len(self._generation) >= MAX_TENANTS:
            self._generation.clear()
        self._generation[tenant] = self._generation.get(tenant, 0) + 1
        for key in [k for k in self._not_due if k[0] == tenant]:  # e.g. a rule of another type now
            del self._not_due[key]

    async def check(self, tenant: str, batch: ReadingColumns, subject: str) -> int:
        """Start ThresholdAlert for each reading of the accepted batch that raises a rule of its
        device's type while no alert of theirs holds, as the batch's sender `subject` of tenant;
        how many started. Never raises."""
        return await self.finish(self.begin(tenant, batch), subject)

    def begin(self, tenant: str, batch: ReadingColumns) -> asyncio.Future[Plan]:
        """The check's reads, begun while the batch is being accepted (its 202 then waits for
        the slower of the two, not for both in turn); then `finish` once the batch is accepted
        or `abandon` when it is not. Bounded in time; never fails."""
        if not self.may_watch(tenant, batch.metrics):  # most batches: no task, no read
            nothing = asyncio.get_running_loop().create_future()
            nothing.set_result(Plan(tenant))
            return nothing
        return asyncio.ensure_future(self._bounded_plan(tenant, batch))

    async def finish(self, planning: asyncio.Future[Plan], subject: str) -> int:
        """Start what `begin` found due, as the batch's sender `subject`; how many started."""
        plan = await planning
        if not plan.starts:
            return 0
        try:
            with acting_for(ServiceActor(subject=subject, tenant=plan.tenant)):
                async with asyncio.timeout(EARLY_START_TIMEOUT_S):
                    await asyncio.gather(*(self._start(raise_) for raise_ in plan.starts))
        except Exception as exc:  # the batch is accepted: its window raises the alert instead
            log.warning("early alert start of %s failed: %s", plan.tenant, exc)
            return 0
        return len(plan.starts)

    def abandon(self, planning: asyncio.Future[Plan]) -> None:
        """The batch was not accepted, or was a duplicate (checked when first accepted): nothing
        starts, the budget goes back and its pairs do not rest."""
        planning.cancel()  # cancelled while reading, the plan gives back what it took
        planning.add_done_callback(self._unplanned)

    def _unplanned(self, planning: asyncio.Future[Plan]) -> None:
        if planning.cancelled():
            return
        plan = planning.result()
        self._give_back(plan.tenant, len(plan.starts))
        for device_id, rule_id in plan.rested:
            self._not_due.pop((plan.tenant, device_id, rule_id), None)

    async def _bounded_plan(self, tenant: str, batch: ReadingColumns) -> Plan:
        try:
            async with asyncio.timeout(EARLY_START_TIMEOUT_S):
                return await self._plan(tenant, batch)
        except Exception as exc:  # the batch's window raises the alert instead
            log.warning("early alert check of %s/%s failed: %s", tenant, batch.batch_id, exc)
            return Plan(tenant)

    async def _plan(self, tenant: str, batch: ReadingColumns) -> Plan:
        rules = await self.rules_of(tenant)
        if not rules or rules.keys().isdisjoint(batch.metrics):
            return Plan(tenant)
        found = self._worth_a_look(tenant, crossings(batch, rules))
        if not found:
            return Plan(tenant)
        # taken before the reads, so a tenant past its budget costs no query (an alert storm
        # over MQTT checks each publish in a task of its own); what is not started goes back
        granted = self._take(tenant, min(len(found), EARLY_PER_BATCH))
        if not granted:
            return Plan(tenant)
        starts: list[EarlyRaise] = []
        try:
            due = await self._due(tenant, rules, found)
            starts = due[:granted]
        finally:
            self._give_back(tenant, granted - len(starts))
        # what was looked at rests, but for what is due and waits for the budget
        waiting = {(r.device_id, r.rule_id) for r in due[granted:]}
        rested = [pair for pair in found if pair not in waiting]
        self._rest(tenant, rested)
        return Plan(tenant, starts, rested)

    def _worth_a_look(
        self, tenant: str, found: dict[tuple[str, str], Crossing]
    ) -> dict[tuple[str, str], Crossing]:
        """found but the pairs looked at less than NOT_DUE_S ago."""
        now = time.monotonic()
        while self._not_due and next(iter(self._not_due.values())) <= now:
            self._not_due.popitem(last=False)
        return {pair: c for pair, c in found.items() if (tenant, *pair) not in self._not_due}

    def _rest(self, tenant: str, pairs: Iterable[tuple[str, str]]) -> None:
        until = time.monotonic() + NOT_DUE_S
        for device_id, rule_id in pairs:
            self._not_due[(tenant, device_id, rule_id)] = until
            self._not_due.move_to_end((tenant, device_id, rule_id))
        while len(self._not_due) > MAX_NOT_DUE:
            self._not_due.popitem(last=False)

    async def _due(
        self, tenant: str, rules: Rules, found: dict[tuple[str, str], Crossing]
    ) -> list[EarlyRaise]:
        """The crossings whose early raise would raise: an active device of the rule's type, no
        alert of theirs holding, a reading newer than what the windows analysed."""
        devices = sorted({device_id for device_id, _ in found})
        type_of_rule = {rule: t for m in rules.values() for rule, t in m.device_types.items()}
        metric_of_rule = {rule: m.metric for m in rules.values() for rule in m.device_types}
        series = sorted({(d, metric_of_rule[r]) for d, r in found})
        # at once, each on a connection of its own: they hold the batch's 202 (and the alert)
        types, holding, seen = await asyncio.gather(
            # active devices only: another's readings are quarantined, its start raises nothing
            device_facade.active_device_types(self.pool, [(tenant, d) for d in devices]),
            analytics_facade.open_alert_keys(self.pool, tenant, list(found)),
            # a reading no newer than what the windows analysed is theirs (raise_early refuses it)
            analytics_facade.series_seen(self.pool, tenant, series),
        )
        return [
            EarlyRaise(tenant=tenant, device_id=device_id, rule_id=rule_id, ts=ts, value=value)
            for (device_id, rule_id), (ts, value) in sorted(found.items())
            if (device_id, rule_id) not in holding
            and types.get((tenant, device_id)) == type_of_rule[rule_id]
            and _before(seen.get((device_id, metric_of_rule[rule_id])), ts)
        ]

    def _take(self, tenant: str, wanted: int) -> int:
        """How many of `wanted` starts the tenant's budget (EARLY_PER_TENANT_S, up to
        EARLY_BURST) allows now; taken from it."""
        now = time.monotonic()
        left, at = self._budgets.get(tenant, (float(EARLY_BURST), now))
        left = min(float(EARLY_BURST), left + (now - at) * EARLY_PER_TENANT_S)
        taken = min(wanted, int(left))
        if tenant not in self._budgets and len(self._budgets) >= MAX_TENANTS:
            self._budgets.clear()  # bounded: a tenant forgotten starts with a full budget
        self._budgets[tenant] = (left - taken, now)
        return taken

    def _give_back(self, tenant: str, unused: int) -> None:
        if unused > 0 and tenant in self._budgets:
            left, at = self._budgets[tenant]
            self._budgets[tenant] = (min(float(EARLY_BURST), left + unused), at)

    async def _start(self, inp: EarlyRaise) -> None:
        await self.temporal.start_workflow(
            ThresholdAlert.run,
            inp,
            id=threshold_alert_id(inp.tenant, inp.device_id, inp.rule_id),
            task_queue=TaskQueue.ORCHESTRATION.value,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=device_search_attributes(inp.tenant, "alert", inp.device_id),
        )
