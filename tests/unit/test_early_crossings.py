"""api/early_alerts.py `crossings`: which readings of an accepted batch raise a threshold rule,
and what a batch may cost (10,000 readings, a tenant's 1,000 rules on their metric)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from temporalio.client import Client

from activities.telemetry_accept import ReadingColumns
from api import early_alerts
from api.early_alerts import MAX_CANDIDATES, EarlyAlerts, Threshold, crossings, index_rules
from fleetflow.db import Pool

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _batch(devices: int, values: list[float], metric: str = "temp") -> ReadingColumns:
    n = devices * len(values)
    return ReadingColumns(
        "b",
        [f"d{i % devices}" for i in range(n)],
        [T0 + timedelta(seconds=i) for i in range(n)],
        [metric] * n,
        [values[i // devices] for i in range(n)],
    )


class Counting(float):
    """A rule bound that counts the comparisons made with it."""

    made = 0

    def __lt__(self, other: object) -> bool:
        Counting.made += 1
        return float(self) < other  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:
        Counting.made += 1
        return float(self) > other  # type: ignore[operator]


def test_the_highest_reading_above_else_the_lowest_below_raises() -> None:
    rules = index_rules(
        [
            Threshold("hot", "sensor", "temp", 30.0, None),
            Threshold("band", "sensor", "temp", 40.0, 0.0),
            Threshold("cold", "sensor", "temp", None, 5.0),
            Threshold("other", "sensor", "rpm", 1.0, None),
        ]
    )
    found = crossings(_batch(1, [20.0, 35.0, -1.0, 33.0]), rules)
    assert found == {
        ("d0", "hot"): (T0 + timedelta(seconds=1), 35.0),
        ("d0", "band"): (T0 + timedelta(seconds=2), -1.0),
        ("d0", "cold"): (T0 + timedelta(seconds=2), -1.0),
    }
    assert crossings(_batch(1, [20.0, 21.0]), rules) == {}


def test_a_batch_of_many_devices_crossing_many_rules_yields_a_bounded_number_of_candidates() -> None:
    rules = index_rules([Threshold(f"r{k}", "sensor", "temp", float(k), None) for k in range(1000)])
    found = crossings(_batch(10_000, [5_000.0]), rules)  # each of 10,000 devices crosses all 1,000
    assert len(found) == MAX_CANDIDATES


def test_rules_a_batch_does_not_cross_cost_no_comparison_each() -> None:
    rules = index_rules(
        [Threshold(f"r{k}", "sensor", "temp", Counting(1e6 + k), Counting(-1e6 - k)) for k in range(1000)]
    )
    Counting.made = 0
    assert crossings(_batch(1000, [20.0]), rules) == {}
    assert Counting.made <= 1000 * 2 * 12  # two binary searches a device, not one test per rule


class _RulesDb:
    """A pool answering each tenant's threshold rules: 1,000 a tenant."""

    async def fetch(self, query: str, tenant: str) -> list[dict[str, Any]]:
        return [
            {"rule_id": f"r{k}", "device_type": "sensor", "metric": "temp", "params": {"above": 1.0}}
            for k in range(1000)
        ]


async def test_rules_of_tenants_no_longer_checking_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(early_alerts, "time", SimpleNamespace(monotonic=lambda: now[0]))  # its clock only
    alerts = EarlyAlerts(cast(Pool, _RulesDb()), cast(Client, None))
    for t in range(300):  # 300 tenants, each once
        await alerts.rules_of(f"t{t}")
    assert alerts.cached_rules <= early_alerts.MAX_CACHED_RULES
    now[0] += 2 * early_alerts.RULES_TTL_S
    await alerts.rules_of("t-new")  # what expired goes
    assert alerts.cached_rules == 1000
    assert alerts.may_watch("t-new")  # it has rules: checked
    assert alerts.may_watch("t-new", ["humidity", "temp"])  # a publish with a watched metric
    assert not alerts.may_watch("t-new", iter(["humidity"]))  # none watched: no task for it


class _Db:
    """A pool answering the early check's reads: one rule, one active sensor, no alert holding."""

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        if "analytics.rules" in query:
            return [{"rule_id": "hot", "device_type": "sensor", "metric": "temp", "params": {"above": 30.0}}]
        if "device.devices" in query:
            return [{"tenant": "acme", "device_id": "d0", "device_type": "sensor"}]
        return []


class _Unanswering:
    """A Temporal frontend that takes a start and never answers it."""

    async def start_workflow(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.Event().wait()


async def test_an_unanswered_start_does_not_hold_the_batchs_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(early_alerts, "EARLY_START_TIMEOUT_S", 0.01)
    alerts = EarlyAlerts(cast(Pool, _Db()), cast(Client, _Unanswering()))
    # the readings are committed: the window raises the alert; the 202 does not wait for Temporal
    assert await asyncio.wait_for(alerts.check("acme", _batch(1, [35.0]), "tester"), 60) == 0


class _Fleet:
    """A pool answering the early check's reads: one rule, 1,000 active sensors, none holding."""

    reads = 0

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        self.reads += 1
        if "analytics.rules" in query:
            return [{"rule_id": "hot", "device_type": "sensor", "metric": "temp", "params": {"above": 30.0}}]
        if "device.devices" in query:
            return [
                {"tenant": t, "device_id": d, "device_type": "sensor"} for t, d in zip(*args, strict=True)
            ]
        return []


class _Starts:
    """A Temporal frontend that counts the starts it takes."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def start_workflow(self, *args: Any, id: str, **kwargs: Any) -> None:
        self.ids.append(id)


async def test_a_tenants_alert_storm_starts_early_alerts_at_a_bounded_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    monkeypatch.setattr(early_alerts, "time", SimpleNamespace(monotonic=lambda: now[0]))  # its clock only
    temporal, db = _Starts(), _Fleet()
    alerts = EarlyAlerts(cast(Pool, db), cast(Client, temporal))
    storm = _batch(1000, [35.0])  # all 1,000 devices hot at once, batch after batch
    started = [await alerts.check("acme", storm, "tester") for _ in range(10)]
    assert sum(started) == early_alerts.EARLY_BURST  # the windows raise the others
    reads = db.reads
    assert await alerts.check("acme", storm, "tester") == 0
    assert db.reads == reads  # past its budget, a tenant's batch costs no query
    now[0] += 1.0
    assert await alerts.check("acme", storm, "tester") == early_alerts.EARLY_PER_TENANT_S
    assert await alerts.check("globex", storm, "tester") > 0  # another tenant's are its own
    now[0] += 1.0
    calm = _batch(1000, [20.0])
    assert [await alerts.check("acme", calm, "tester") for _ in range(5)] == [0] * 5
    # the calm batches took nothing of the budget
    ones = [ReadingColumns("b", [f"x{i}"], [T0], ["temp"], [35.0]) for i in range(10)]
    assert [await alerts.check("acme", one, "tester") for one in ones] == [1] * 10


class _SlowRulesDb(_RulesDb):
    """_RulesDb answering once `gate` is set, counting the reads."""

    def __init__(self) -> None:
        self.gate, self.reads = asyncio.Event(), 0

    async def fetch(self, query: str, tenant: str) -> list[dict[str, Any]]:
        self.reads += 1
        await self.gate.wait()
        return await super().fetch(query, tenant)


async def test_batches_arriving_while_a_tenants_rules_are_read_wait_for_that_one_read() -> None:
    db = _SlowRulesDb()
    alerts = EarlyAlerts(cast(Pool, db), cast(Client, None))
    waiting = [asyncio.ensure_future(alerts.rules_of("acme")) for _ in range(100)]
    await asyncio.sleep(0)
    db.gate.set()
    answers = await asyncio.gather(*waiting)
    assert db.reads == 1 and all(len(a["temp"].above) == 1000 for a in answers)


class _Holding(_Fleet):
    """_Fleet where each device's alert of the rule holds already."""

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        if "analytics.alerts" in query:
            self.reads += 1
            return [{"device_id": d, "rule_id": r} for d, r in zip(args[1], args[2], strict=True)]
        return await super().fetch(query, *args)


async def test_a_device_staying_hot_while_its_alert_holds_costs_no_query_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    monkeypatch.setattr(early_alerts, "time", SimpleNamespace(monotonic=lambda: now[0]))  # its clock only
    db = _Holding()
    alerts = EarlyAlerts(cast(Pool, db), cast(Client, _Starts()))
    hot = _batch(1, [35.0])
    assert await alerts.check("acme", hot, "tester") == 0  # looked at: its alert holds
    reads = db.reads
    for _ in range(100):  # publish after publish of the device, still hot, within the rules' TTL
        assert await alerts.check("acme", hot, "tester") == 0
    assert db.reads == reads
    other = ReadingColumns("b", ["d9"], [T0], ["temp"], [35.0])
    assert await alerts.check("acme", other, "tester") == 0
    assert db.reads > reads  # another device's crossing is looked at
    reads = db.reads
    assert await alerts.check("globex", hot, "tester") == 0
    assert db.reads > reads  # and another tenant's same device and rule
    now[0] += early_alerts.NOT_DUE_S
    reads = db.reads
    assert await alerts.check("acme", hot, "tester") == 0
    assert db.reads > reads  # looked at again after a while (its alert may have cleared)


class _ChangingRulesDb(_SlowRulesDb):
    """_SlowRulesDb answering one rule above `bound` (as it was when the read began)."""

    bound = 30.0

    async def fetch(self, query: str, tenant: str) -> list[dict[str, Any]]:
        self.reads, bound = self.reads + 1, self.bound
        await self.gate.wait()
        return [{"rule_id": "r", "device_type": "sensor", "metric": "temp", "params": {"above": bound}}]


async def test_a_rule_read_begun_before_the_rules_changed_is_not_kept_after() -> None:
    db = _ChangingRulesDb()
    alerts = EarlyAlerts(cast(Pool, db), cast(Client, None))
    before = asyncio.ensure_future(alerts.rules_of("acme"))
    for _ in range(10):  # its read gets under way
        await asyncio.sleep(0)
    assert db.reads == 1
    db.bound = 50.0
    alerts.forget("acme")  # the rule changed (PUT /v1/rules/r in this process)
    db.gate.set()
    assert (await before)["temp"].aboves == [30.0]  # begun before: as it was
    assert (await alerts.rules_of("acme"))["temp"].aboves == [50.0]


class _Stuck(_Db):
    """_Db whose alert reads wait for a connection that never comes (a pool taken)."""

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        if "analytics.alerts" in query:
            await asyncio.Event().wait()
        return await super().fetch(query, *args)


async def test_an_unanswered_read_does_not_hold_the_batchs_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(early_alerts, "EARLY_START_TIMEOUT_S", 0.01)
    temporal = _Starts()
    alerts = EarlyAlerts(cast(Pool, _Stuck()), cast(Client, temporal))
    assert await asyncio.wait_for(alerts.check("acme", _batch(1, [35.0]), "tester"), 60) == 0
    assert alerts._take("acme", early_alerts.EARLY_BURST) == early_alerts.EARLY_BURST  # all given back


class _StuckRules(_Db):
    """_Db whose rule read waits for a connection that never comes."""

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        await asyncio.Event().wait()
        return []


async def test_a_publish_checked_while_the_rules_read_hangs_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(early_alerts, "EARLY_START_TIMEOUT_S", 0.01)
    alerts = EarlyAlerts(cast(Pool, _StuckRules()), cast(Client, _Starts()))
    row = f"d0,temp,{T0.isoformat()},35\n"
    # the gateway's task of the publish ends (a task a publish piled up while the read waited)
    assert await asyncio.wait_for(alerts.check_rows("acme", "d0", [row]), 60) == 0


async def test_a_batch_refused_after_its_check_read_starts_nothing_and_leaves_its_pairs_due() -> None:
    # the check's reads run beside the batch's accept: the accept refuses the batch (409, 503)
    # after they ended; nothing starts, the budget is whole again, and the sender's next
    # crossing reading of the device is looked at (not resting as if it had been checked)
    temporal = _Starts()
    alerts = EarlyAlerts(cast(Pool, _Db()), cast(Client, temporal))
    planning = alerts.begin("acme", _batch(1, [35.0]))
    plan = await planning  # read while the accept ran
    assert [r.device_id for r in plan.starts] == ["d0"]
    alerts.abandon(planning)
    await asyncio.sleep(0)  # its done callback
    assert temporal.ids == []
    assert alerts._take("acme", early_alerts.EARLY_BURST) == early_alerts.EARLY_BURST
    alerts._give_back("acme", early_alerts.EARLY_BURST)
    assert await alerts.check("acme", _batch(1, [36.0]), "tester") == 1
    assert len(temporal.ids) == 1


async def test_a_batch_refused_while_its_check_reads_gives_the_budget_back() -> None:
    temporal = _Starts()
    alerts = EarlyAlerts(cast(Pool, _Stuck()), cast(Client, temporal))  # its alert read hangs
    planning = alerts.begin("acme", _batch(1, [35.0]))
    for _ in range(10):  # its reads get under way
        await asyncio.sleep(0)
    alerts.abandon(planning)
    with pytest.raises(asyncio.CancelledError):
        await planning
    assert temporal.ids == []
    assert alerts._take("acme", early_alerts.EARLY_BURST) == early_alerts.EARLY_BURST
