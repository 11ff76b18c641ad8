"""The alarm lifecycle on the real servers: severities, acknowledge and clear by hand (with their
events), filters and pages of `GET /v1/alerts`, one alert for a flapping sensor, tenants apart."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from fleetflow.db import Pool
from tests.integration.flows import AUTH, active_device, new_id
from tests.integration.test_telemetry import device_auth, send
from tests.support import bearer, eventually

GLOBEX = bearer("globex")
READ_ONLY = bearer("acme", scopes=["telemetry:read"])
START = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=20)


class Sensor:
    """A thermostat of one tenant with a threshold rule on its own metric."""

    def __init__(self, api: httpx.AsyncClient, pool: Pool, auth: dict[str, str] = AUTH) -> None:
        self.api, self.pool, self.auth = api, pool, auth
        self.metric = f"m_{uuid.uuid4().hex[:8]}"
        self.sent = 0

    async def start(self, severity: str | None = None, device_id: str | None = None) -> Sensor:
        rule: dict[str, Any] = {
            "rule_id": f"r-{self.metric}",
            "device_type": "thermostat",
            "metric": self.metric,
            "kind": "threshold",
            "params": {"above": 30, "clear_above": 28},
        }
        if severity is not None:
            rule["severity"] = severity
        put = await self.api.put(f"/v1/rules/{rule['rule_id']}", json=rule, headers=self.auth)
        assert put.status_code == 200, put.text
        self.device_id, credential = await active_device(self.api, auth=self.auth, device_id=device_id)
        self.me = device_auth(credential)
        return self

    async def send(self, *values: float, auth: dict[str, str] | None = None) -> None:
        """Send values as one batch of the device (with its credential, or auth), each a second
        after the last one sent."""
        rows = [
            {
                "device_id": self.device_id,
                "ts": (START + timedelta(seconds=self.sent + i)).isoformat(),
                "metric": self.metric,
                "value": v,
            }
            for i, v in enumerate(values)
        ]
        answer = await send(self.api, auth or self.me, rows)
        assert answer.status_code == 202, answer.text
        self.sent += len(values)

    async def window(self, *values: float) -> None:
        """Send values as one batch and wait until they are stored (so each is its own window,
        analysed in order)."""
        await self.send(*values)
        await eventually(self._analysed, lambda n: n >= self.sent)

    async def _analysed(self) -> int:
        # stored and past analysis: the series state counts every reading the rules saw
        n = await self.pool.fetchval(
            "SELECT n FROM analytics.series WHERE device_id = $1 AND metric = $2 AND tenant = $3",
            self.device_id,
            self.metric,
            "globex" if self.auth is GLOBEX else "acme",
        )
        return int(n or 0)

    async def alerts(self, **params: Any) -> list[dict[str, Any]]:
        answer = await self.api.get(
            "/v1/alerts", params={"device_id": self.device_id, **params}, headers=self.auth
        )
        assert answer.status_code == 200, answer.text
        body: list[dict[str, Any]] = answer.json()
        return [a for a in body if a["metric"] == self.metric]

    async def events(self) -> list[tuple[str, str, dict[str, Any]]]:
        rows = await self.pool.fetch(
            """SELECT type, actor, data FROM notification.events
               WHERE device_id = $1 AND type LIKE 'Alert%' AND data->>'metric' = $2 ORDER BY seq""",
            self.device_id,
            self.metric,
        )
        return [(r["type"], r["actor"], dict(r["data"])) for r in rows]


async def test_an_alert_carries_its_rules_severity_and_filters_find_it(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    critical = await Sensor(api, pool).start("critical")
    plain = await Sensor(api, pool).start()  # no severity: major
    await critical.window(35)
    await plain.window(36)
    [c] = await eventually(critical.alerts, lambda a: len(a) == 1)
    [p] = await eventually(plain.alerts, lambda a: len(a) == 1)
    assert (c["severity"], p["severity"]) == ("critical", "major")
    assert [a["alert_id"] for a in await critical.alerts(severity="critical")] == [c["alert_id"]]
    assert await critical.alerts(severity="minor") == []
    assert await plain.alerts(status="acknowledged") == []
    rules = (await api.get("/v1/rules", headers=AUTH)).json()
    assert {r["rule_id"]: r["severity"] for r in rules}[f"r-{critical.metric}"] == "critical"
    bad = await api.get("/v1/alerts", params={"severity": "apocalyptic"}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["query", "severity"]
    bad_rule = await api.put(
        "/v1/rules/x",
        json={
            "rule_id": "x",
            "device_type": "thermostat",
            "metric": "t",
            "kind": "threshold",
            "params": {"above": 1},
            "severity": "apocalyptic",
        },
        headers=AUTH,
    )
    assert bad_rule.status_code == 422 and bad_rule.json()["errors"][0]["loc"][-1] == "severity"


async def test_acknowledge_then_clear_by_hand_with_events(api: httpx.AsyncClient, pool: Pool) -> None:
    s = await Sensor(api, pool).start("minor")
    await s.window(35)
    [alert] = await eventually(s.alerts, lambda a: len(a) == 1)
    url = f"/v1/alerts/{alert['alert_id']}"

    assert (await api.post(url + "/acknowledge", json={}, headers=READ_ONLY)).status_code == 403
    acked = await api.post(url + "/acknowledge", json={"comment": "on it"}, headers=AUTH)
    assert acked.status_code == 200, acked.text
    body = acked.json()
    assert (body["status"], body["acknowledged_by"], body["ack_comment"]) == (
        "acknowledged",
        "tester",
        "on it",
    )
    assert body["acknowledged_at"] is not None
    again = await api.post(url + "/acknowledge", headers=AUTH)
    assert again.status_code == 409 and "acknowledged by tester" in again.json()["detail"]
    assert [a["alert_id"] for a in await s.alerts(status="acknowledged")] == [alert["alert_id"]]
    assert await s.alerts(status="open") == []
    # `active` is what still holds: open or acknowledged, not cleared
    assert [a["alert_id"] for a in await s.alerts(status="active")] == [alert["alert_id"]]

    cleared = await api.post(url + "/clear", json={"comment": "replaced the fan"}, headers=AUTH)
    assert cleared.status_code == 200, cleared.text
    c = cleared.json()
    assert (c["status"], c["cleared_by"], c["clear_comment"]) == ("cleared", "tester", "replaced the fan")
    assert c["acknowledged_by"] == "tester"  # the acknowledgement stays on the record
    assert (await api.post(url + "/clear", headers=AUTH)).status_code == 409
    assert await s.alerts(status="active") == []
    assert (await api.post(url + "/acknowledge", headers=AUTH)).status_code == 409
    missing = await api.post("/v1/alerts/999999999999/acknowledge", headers=AUTH)
    assert missing.status_code == 404
    long = await api.post(url + "/clear", json={"comment": "x" * 1001}, headers=AUTH)
    assert long.status_code == 422 and long.json()["errors"][0]["loc"] == ["body", "comment"]

    events = await eventually(s.events, lambda e: len(e) == 3)
    assert [(t, actor) for t, actor, _ in events] == [
        ("AlertRaised", "analytics"),
        ("AlertAcknowledged", "tester"),
        ("AlertCleared", "tester"),
    ]
    assert events[1][2]["comment"] == "on it" and events[2][2]["by_hand"] is True
    assert {e[2]["alert_id"] for e in events} == {alert["alert_id"]}
    assert {e[2]["severity"] for e in events} == {"minor"}


async def test_a_flapping_sensor_raises_one_alert_acknowledged_or_not(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    s = await Sensor(api, pool).start()
    await s.window(35)
    await s.window(29)  # between the clear and raise limits: holds
    await s.window(36)
    [alert] = await s.alerts()
    assert alert["status"] == "open"
    acked = await api.post(f"/v1/alerts/{alert['alert_id']}/acknowledge", headers=AUTH)
    assert acked.status_code == 200
    await s.window(37)  # the rule would raise again: the acknowledged alert is that alert
    await s.window(29.5)
    await s.window(38)
    [still] = await s.alerts()
    assert (still["alert_id"], still["status"]) == (alert["alert_id"], "acknowledged")
    await s.window(25)  # the rule clears an acknowledged alert like an open one
    [done] = await s.alerts()
    assert (done["status"], done["cleared_by"], done["cleared_value"]) == ("cleared", None, 25)
    kinds = [t for t, _, _ in await eventually(s.events, lambda e: len(e) == 3)]
    assert kinds == ["AlertRaised", "AlertAcknowledged", "AlertCleared"]


async def test_an_alert_cleared_by_hand_while_its_condition_holds_is_raised_anew(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    s = await Sensor(api, pool).start()
    await s.window(35)
    [first] = await s.alerts()
    assert (await api.post(f"/v1/alerts/{first['alert_id']}/clear", headers=AUTH)).status_code == 200
    await s.window(29)  # hold: nothing new yet
    assert [a["status"] for a in await s.alerts()] == ["cleared"]
    await s.window(36)  # still too hot: a new alert, the cleared one stays cleared
    second, old = await s.alerts()
    assert old["alert_id"] == first["alert_id"] and old["status"] == "cleared"
    assert second["alert_id"] > first["alert_id"] and second["status"] == "open"


async def test_pages_of_alerts(api: httpx.AsyncClient, pool: Pool) -> None:
    s = await Sensor(api, pool).start()
    for _ in range(3):
        await s.window(35)
        [latest, *_] = await s.alerts()
        assert (await api.post(f"/v1/alerts/{latest['alert_id']}/clear", headers=AUTH)).status_code == 200
    every = [a["alert_id"] for a in await s.alerts()]
    assert len(every) == 3 and every == sorted(every, reverse=True)
    page1 = await s.alerts(limit=2)
    page2 = await s.alerts(limit=2, before=page1[-1]["alert_id"])
    assert [a["alert_id"] for a in page1 + page2] == every


async def test_another_tenant_cannot_see_acknowledge_or_clear_an_alert(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id = new_id("twice")
    ours = await Sensor(api, pool).start(device_id=device_id)
    theirs = Sensor(api, pool, GLOBEX)
    theirs.metric = ours.metric  # the same device id, rule id and metric in both tenants
    await theirs.start(device_id=device_id)
    await ours.window(35)
    await theirs.window(36)
    [mine] = await eventually(ours.alerts, lambda a: len(a) == 1)
    [their] = await eventually(theirs.alerts, lambda a: len(a) == 1)
    assert mine["alert_id"] != their["alert_id"] and their["raised_value"] == 36
    for action in ("acknowledge", "clear"):
        refused = await api.post(f"/v1/alerts/{mine['alert_id']}/{action}", headers=GLOBEX)
        assert refused.status_code == 404, refused.text
        assert str(mine["alert_id"]) in refused.json()["detail"]
    listed = (await api.get("/v1/alerts", params={"limit": 1000}, headers=GLOBEX)).json()
    assert mine["alert_id"] not in {a["alert_id"] for a in listed}
    [unchanged] = await ours.alerts()
    assert unchanged == mine
    assert (await api.post(f"/v1/alerts/{their['alert_id']}/acknowledge", headers=GLOBEX)).status_code == 200
    assert (await ours.alerts())[0]["status"] == "open"
