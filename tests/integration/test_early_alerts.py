"""Threshold alerts raised as their reading is accepted (api/early_alerts.py,
workflows/threshold_alert.py): before the reading's window is stored, once per device and rule,
for active devices of the rule's type only, tenants apart; and an older window never clears an
alert a newer reading raised."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.converter import PayloadConverter
from temporalio.service import RPCError

from activities.analytics import RAISE_SQL, AnalyticsService
from api.early_alerts import EarlyAlerts
from fleetflow.contracts.telemetry import EarlyRaise
from fleetflow.db import Pool
from fleetflow.identity import HEADER
from fleetflow.keys import keyring
from fleetflow.security import verify_service_token
from fleetflow.settings import Settings
from tests.integration.conftest import ENTERED
from tests.integration.flows import AUTH, new_id, onboard, progress_until
from tests.integration.mqtt_support import Device, GatewayProcess, gateway_process
from tests.integration.test_alarms import GLOBEX, START, Sensor
from tests.support import eventually
from workflows.threshold_alert import threshold_alert_id


@pytest.fixture(scope="module")
def gateway(settings: Settings, pool: Pool) -> Iterator[GatewayProcess]:
    yield from gateway_process(settings)


class _Rollback(Exception):
    pass


async def _raised_early_then(s: Sensor, action: str, backlog: asyncio.Event) -> dict[str, Any]:
    """A 35 raises s's alert early, `action` is taken on it by hand, then its window is stored
    and analysed; the alert as it was raised."""
    await s.send(35)
    [alert] = await eventually(s.alerts, lambda a: len(a) == 1)
    acted = await s.api.post(f"/v1/alerts/{alert['alert_id']}/{action}", json={}, headers=AUTH)
    assert acted.status_code == 200, acted.text
    backlog.set()
    await eventually(s._analysed, lambda n: n >= 1)
    return alert


async def _store_waits() -> bool:
    return "store_window" in ENTERED


async def _pending(pool: Pool, device_id: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM data.ingest_batches WHERE $1 = ANY(device_ids) AND status <> 'stored'",
            device_id,
        )
    )


async def test_a_reading_crossing_a_threshold_raises_its_alert_while_its_window_waits(
    api: httpx.AsyncClient, pool: Pool, backlog: asyncio.Event
) -> None:
    s = await Sensor(api, pool).start()
    await s.send(20, 35, 22)  # the highest crossing reading raises
    [alert] = await eventually(s.alerts, lambda a: len(a) == 1)
    assert (alert["status"], alert["raised_value"]) == ("open", 35)
    [(kind, actor, data)] = await eventually(s.events, lambda e: len(e) == 1)
    assert (kind, actor, data["value"]) == ("AlertRaised", "analytics", 35)
    assert data["alert_id"] == alert["alert_id"]
    assert await _pending(pool, s.device_id) == 1  # its window is not stored yet
    await s.send(36)  # the alert holds: nothing raised again
    backlog.set()
    await eventually(s._analysed, lambda n: n >= 4)
    [still] = await s.alerts()
    assert (still["alert_id"], still["status"]) == (alert["alert_id"], "open")
    assert [k for k, _, _ in await s.events()] == ["AlertRaised"]  # the windows raised nothing again


async def test_an_older_window_does_not_clear_an_alert_a_newer_reading_raised(
    api: httpx.AsyncClient, pool: Pool, backlog: asyncio.Event
) -> None:
    s = await Sensor(api, pool).start()
    await s.send(20)  # in the limits, but older than what follows
    await eventually(_store_waits, bool)  # its window is claimed: the next one is another
    await s.send(35)
    [alert] = await eventually(s.alerts, lambda a: len(a) == 1)
    backlog.set()
    await eventually(s._analysed, lambda n: n >= 2)
    [still] = await s.alerts()
    assert (still["alert_id"], still["status"]) == (alert["alert_id"], "open")
    await s.window(25)  # newer readings in the limits clear it, as ever
    [cleared] = await s.alerts()
    assert (cleared["status"], cleared["cleared_value"]) == ("cleared", 25)
    events = await eventually(s.events, lambda e: len(e) == 2)
    assert [k for k, _, _ in events] == ["AlertRaised", "AlertCleared"]


async def test_no_early_alert_for_another_type_an_unknown_device_or_a_disabled_rule(
    api: httpx.AsyncClient, pool: Pool, backlog: asyncio.Event
) -> None:
    s = await Sensor(api, pool).start()
    ghost = Sensor(api, pool)
    ghost.metric, ghost.device_id = s.metric, new_id("ghost")  # never onboarded
    await ghost.send(99, auth=AUTH)
    rule = f"/v1/rules/r-{s.metric}"
    body = (await api.get("/v1/rules", headers=AUTH)).json()
    [mine] = [r for r in body if r["rule_id"] == f"r-{s.metric}"]
    other_type = await api.put(rule, json={**mine, "device_type": "camera"}, headers=AUTH)
    assert other_type.status_code == 200
    await s.send(40)
    await api.put(rule, json={**mine, "enabled": False}, headers=AUTH)
    await s.send(41)
    backlog.set()
    await eventually(s._analysed, lambda n: n >= 2)
    assert await s.alerts() == [] and await ghost.alerts() == []
    assert await s.events() == []


async def test_two_tenants_with_the_same_device_and_rule_ids_raise_their_own_alert(
    api: httpx.AsyncClient, pool: Pool, backlog: asyncio.Event
) -> None:
    device_id = new_id("same")
    ours = await Sensor(api, pool).start(device_id=device_id)
    theirs = Sensor(api, pool, GLOBEX)
    theirs.metric = ours.metric
    await theirs.start(device_id=device_id)
    await ours.send(35)
    [mine] = await eventually(ours.alerts, lambda a: len(a) == 1)
    await theirs.send(36)
    [their] = await eventually(theirs.alerts, lambda a: len(a) == 1)
    assert mine["alert_id"] != their["alert_id"] and (mine["raised_value"], their["raised_value"]) == (35, 36)


async def test_an_early_raise_after_the_windows_saw_a_later_reading_raises_nothing(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    s = await Sensor(api, pool).start()
    await s.window(35)
    await eventually(s.alerts, lambda a: len(a) == 1)
    await s.window(25)  # cleared by the windows
    late = EarlyRaise(
        tenant="acme",
        device_id=s.device_id,
        rule_id=f"r-{s.metric}",
        ts=START,  # the 35, whose early raise came after both windows (a slow start)
        value=35,
        window_id=f"test-{new_id()}",
    )
    assert await AnalyticsService(pool).raise_early(late) == 0
    assert [a["status"] for a in await s.alerts()] == ["cleared"]
    assert await AnalyticsService(pool).raise_early(late) == 0  # and a retry of it


async def test_a_reading_published_over_mqtt_raises_its_alert_while_its_window_waits(
    api: httpx.AsyncClient,
    pool: Pool,
    client: Client,
    settings: Settings,
    gateway: GatewayProcess,
    backlog: asyncio.Event,
) -> None:
    s = await Sensor(api, pool).start()
    token = s.me["Authorization"].removeprefix("Bearer ")
    device = Device(gateway.port, s.device_id, token)
    try:
        assert await device.connect() == 0
        reading = {"metric": s.metric, "value": 33, "ts": START.isoformat()}
        topic = f"tenants/acme/devices/{s.device_id}/telemetry"
        assert await device.puback(device.publish(topic, json.dumps(reading))) == 0
    finally:
        device.close()
    [alert] = await eventually(s.alerts, lambda a: len(a) == 1)
    assert (alert["status"], alert["raised_value"]) == ("open", 33)
    assert await _pending(pool, s.device_id) == 1
    # the gateway's start (a task of its own) acts for the publishing device, in its tenant
    history = await client.get_workflow_handle(
        threshold_alert_id("acme", s.device_id, f"r-{s.metric}")
    ).fetch_history()
    header = history.events[0].workflow_execution_started_event_attributes.header.fields[HEADER]
    codec = client.data_converter.payload_codec
    [opened] = await codec.decode([header]) if codec is not None else [header]
    token = PayloadConverter.default.from_payloads([opened])[0]
    actor = verify_service_token(keyring(settings), token, settings.jwt_issuer).actor
    assert (actor.subject, actor.tenant) == (f"device:{s.device_id}", "acme")


async def test_a_device_whose_clock_jumped_back_still_clears_its_alert(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    s = await Sensor(api, pool).start()
    s.sent = 600  # ten minutes on: the device's clock runs ahead
    await s.send(35)
    await eventually(s._analysed, lambda n: n >= 1)
    [alert] = await eventually(s.alerts, lambda a: len(a) == 1)
    s.sent = 0  # its clock is set right: its next readings are older than the one that raised
    await s.send(25)
    await eventually(s._analysed, lambda n: n >= 2)
    [cleared] = await eventually(s.alerts, lambda a: a[0]["status"] == "cleared")
    assert (cleared["alert_id"], cleared["cleared_value"]) == (alert["alert_id"], 25)


async def test_a_reading_whose_early_alert_was_cleared_by_hand_does_not_raise_it_again_in_its_window(
    api: httpx.AsyncClient, pool: Pool, backlog: asyncio.Event
) -> None:
    s = await Sensor(api, pool).start()
    await _raised_early_then(s, "clear", backlog)
    assert [a["status"] for a in await s.alerts()] == ["cleared"]  # its window saw the same 35
    await s.window(36)  # a later reading crossing again raises a new one, as ever
    assert [a["status"] for a in await s.alerts()] == ["open", "cleared"]


async def test_a_device_not_yet_active_starts_no_early_alert(
    api: httpx.AsyncClient, pool: Pool, client: Client, backlog: asyncio.Event
) -> None:
    s = await Sensor(api, pool).start()
    waiting = Sensor(api, pool)
    waiting.metric, waiting.device_id = s.metric, new_id("waiting")
    assert (await onboard(api, waiting.device_id)).status_code == 202
    await progress_until(api, waiting.device_id, "awaiting_first_contact")  # its readings are quarantined
    await waiting.send(99, auth=AUTH)
    await s.send(35)  # a batch after it: its start is not behind the other's
    await eventually(s.alerts, lambda a: len(a) == 1)
    raise_id = threshold_alert_id("acme", waiting.device_id, f"r-{s.metric}")
    with pytest.raises(RPCError):  # no workflow started that could raise nothing
        await client.get_workflow_handle(raise_id).describe()


async def test_the_window_raises_the_alert_when_the_api_died_before_its_early_start(
    api: httpx.AsyncClient, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def died(*_: object) -> int:
        return 0  # the batch committed, the process ended before it started ThresholdAlert

    monkeypatch.setattr(EarlyAlerts, "check", died)
    s = await Sensor(api, pool).start()
    await s.window(20, 35, 22)
    [alert] = await eventually(s.alerts, lambda a: len(a) == 1)
    assert (alert["status"], alert["raised_value"]) == ("open", 35)
    [(kind, _, data)] = await eventually(s.events, lambda e: len(e) == 1)
    assert (kind, data["alert_id"]) == ("AlertRaised", alert["alert_id"])


async def test_an_early_raise_whose_rule_became_a_rate_or_was_deleted_raises_nothing(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    s = await Sensor(api, pool).start()
    rule = f"/v1/rules/r-{s.metric}"
    [mine] = [r for r in (await api.get("/v1/rules", headers=AUTH)).json() if r["rule_id"] == f"r-{s.metric}"]
    in_flight = EarlyRaise(
        tenant="acme", device_id=s.device_id, rule_id=f"r-{s.metric}", ts=START, value=35, window_id=""
    )
    rate = {**mine, "kind": "rate", "params": {"max_per_s": 1}}
    assert (await api.put(rule, json=rate, headers=AUTH)).status_code == 200
    analytics = AnalyticsService(pool)
    assert await analytics.raise_early(in_flight.model_copy(update={"window_id": f"t-{new_id()}"})) == 0
    assert (await api.delete(rule, headers=AUTH)).status_code == 204
    assert await analytics.raise_early(in_flight.model_copy(update={"window_id": f"t-{new_id()}"})) == 0
    assert await s.alerts() == []


async def test_a_crossing_reading_older_than_what_the_windows_saw_starts_no_early_alert(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    s = await Sensor(api, pool).start()
    s.sent = 60
    await s.send(20)
    await eventually(s._analysed, lambda n: n >= 1)
    s.sent = 0  # a late reading, a minute older than the one its windows analysed
    await s.send(35)
    raise_id = threshold_alert_id("acme", s.device_id, f"r-{s.metric}")
    with pytest.raises(RPCError):  # raise_early would refuse it: no workflow started for nothing
        await client.get_workflow_handle(raise_id).describe()
    [alert] = await eventually(s.alerts, lambda a: len(a) == 1)  # its window raises it, as ever
    assert alert["raised_value"] == 35


def _removed(plan: dict[str, Any]) -> int:
    """Rows a plan's nodes read and threw away (filtered out), all nodes together."""
    own = int(plan.get("Rows Removed by Filter", 0)) + int(plan.get("Rows Removed by Index Recheck", 0))
    return own + sum(_removed(p) for p in plan.get("Plans", []))


async def test_a_window_raise_does_not_read_every_alert_its_device_ever_had(pool: Pool) -> None:
    device_id = new_id("flapping")
    with pytest.raises(_Rollback):  # nothing of it stays
        async with pool.acquire() as conn, conn.transaction():
            # years of a flapping device: 5,000 cleared alerts of its other rule, 5,000 of this one
            await conn.execute(
                """INSERT INTO analytics.alerts (tenant, device_id, rule_id, metric, status, raised_at,
                       raised_value, detail)
                   SELECT 'acme', $1, CASE WHEN g % 2 = 0 THEN 'other' ELSE 'r' END, 'temp',
                       'cleared', $2::timestamptz - g * interval '1 minute', 35, 'x'
                   FROM generate_series(1, 10000) g""",
                device_id,
                START,
            )
            await conn.execute("ANALYZE analytics.alerts")
            args = ("acme", device_id, "r", "temp", START, 35.0, "35 above 30", "major", START)
            raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {RAISE_SQL}", *args)
            [explained] = json.loads(raw) if isinstance(raw, str) else raw
            raise _Rollback
    assert _removed(explained["Plan"]) < 100  # the rule's alerts in the window's span only


async def test_an_early_alert_acknowledged_then_cleared_by_its_rule_is_raised_anew_by_a_later_window(
    api: httpx.AsyncClient, pool: Pool, backlog: asyncio.Event
) -> None:
    s = await Sensor(api, pool).start()
    alert = await _raised_early_then(s, "acknowledge", backlog)
    await s.window(25)  # cleared by its rule
    # crossing again within seconds: the early check leaves that device and rule alone a while
    # (it looked at them), and the window raises the new alert
    await s.window(36)
    [new, old] = await s.alerts()
    assert (old["alert_id"], old["status"]) == (alert["alert_id"], "cleared")
    assert (new["status"], new["raised_value"]) == ("open", 36)
    kinds = await eventually(s.events, lambda e: len(e) == 4)
    assert [k for k, _, _ in kinds] == ["AlertRaised", "AlertAcknowledged", "AlertCleared", "AlertRaised"]


async def test_a_last_will_crossing_a_threshold_raises_its_alert_while_its_window_waits(
    api: httpx.AsyncClient, pool: Pool, gateway: GatewayProcess, backlog: asyncio.Event
) -> None:
    # the gateway publishes the will as if the device had (gateway/server.py _publish_will)
    s = await Sensor(api, pool).start()
    token = s.me["Authorization"].removeprefix("Bearer ")
    silent = Device(gateway.port, s.device_id, token, keep_alive=1)
    will = {"metric": s.metric, "value": 34, "ts": START.isoformat()}
    silent.client.will_set(f"tenants/acme/devices/{s.device_id}/telemetry", json.dumps(will), qos=1)
    assert await silent.connect() == 0
    silent.client.loop_stop()  # silent: its keep-alive expires, the will is published
    try:
        [alert] = await eventually(s.alerts, lambda a: len(a) == 1)
    finally:
        silent.client.disconnect()
    assert (alert["status"], alert["raised_value"]) == ("open", 34)
    assert await _pending(pool, s.device_id) == 1  # its window is not stored yet


async def test_a_refused_batch_starts_no_early_alert_and_leaves_the_next_crossing_its_own(
    api: httpx.AsyncClient, pool: Pool, backlog: asyncio.Event
) -> None:
    # the check's reads run beside the accept: a batch the accept refuses (409: its id was
    # used for other readings) starts nothing, and what it looked at does not rest, so the
    # sender's next crossing reading still raises its alert at once
    s = await Sensor(api, pool).start()

    async def post(batch_id: str, value: float) -> int:
        reading = {"device_id": s.device_id, "ts": START.isoformat(), "metric": s.metric, "value": value}
        body = {"batch_id": batch_id, "readings": [reading]}
        return (await api.post("/v1/telemetry", json=body, headers=s.me)).status_code

    assert await post("b-1", 20) == 202
    assert await post("b-1", 35) == 409  # the same id, other readings: refused
    assert await s.alerts() == []
    s.sent = 1
    await s.send(36)
    [alert] = await eventually(s.alerts, lambda a: len(a) == 1)
    assert (alert["raised_value"], await _pending(pool, s.device_id)) == (36, 2)  # no window yet
