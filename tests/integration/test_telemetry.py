"""Telemetry through the API and the TelemetryIngestion workflows, on the real servers."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from fleetflow.db import Pool
from tests.integration.flows import AUTH, active_device
from tests.support import eventually

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)


def readings(
    device_id: str, values: list[float], start: int = 0, metric: str = "temperature"
) -> list[dict[str, Any]]:
    return [
        {
            "device_id": device_id,
            "ts": (T0 + timedelta(seconds=start + i)).isoformat(),
            "metric": metric,
            "value": v,
        }
        for i, v in enumerate(values)
    ]


async def send(
    api: httpx.AsyncClient, auth: dict[str, str], rows: list[dict[str, Any]], batch_id: str | None = None
) -> httpx.Response:
    body = {"batch_id": batch_id or uuid.uuid4().hex, "readings": rows}
    # json.dumps writes NaN and Infinity, as a careless client would
    content = json.dumps(body).encode()
    return await api.post(
        "/v1/telemetry", content=content, headers={**auth, "Content-Type": "application/json"}
    )


async def stored(pool: Pool, device_id: str) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM data.readings WHERE device_id = $1", device_id))


def device_auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def alerts(api: httpx.AsyncClient, device_id: str) -> list[dict[str, Any]]:
    body: list[dict[str, Any]] = (
        await api.get("/v1/alerts", params={"device_id": device_id}, headers=AUTH)
    ).json()
    return body


async def test_readings_are_stored_once_and_alerts_raise_and_clear_with_hysteresis(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    rule = {
        "rule_id": "hot",
        "device_type": "thermostat",
        "metric": "temperature",
        "kind": "threshold",
        "params": {"above": 30, "clear_above": 28},
    }
    assert (await api.put("/v1/rules/hot", json=rule, headers=AUTH)).status_code == 200
    device_id, credential = await active_device(api)
    me = device_auth(credential)

    first = await send(api, me, readings(device_id, [20, 21, 22, 23, 24]), batch_id="b-1")
    assert first.status_code == 202 and first.json() == {"batch_id": "b-1", "readings": 5, "duplicate": False}
    again = await send(api, me, readings(device_id, [20, 21, 22, 23, 24]), batch_id="b-1")
    assert again.status_code == 202 and again.json()["duplicate"] is True
    await eventually(lambda: stored(pool, device_id), lambda n: n == 5)

    # above 30 raises; staying above, or between 28 and 30, raises nothing more
    spikes: list[tuple[int, list[float]]] = [(10, [25, 35, 26]), (20, [36, 37]), (30, [29.5, 29])]
    for start, values in spikes:
        assert (await send(api, me, readings(device_id, values, start))).status_code == 202
    raised = await eventually(lambda: alerts(api, device_id), lambda a: len(a) == 1)
    assert raised[0]["status"] == "open" and raised[0]["raised_value"] in (35, 36, 37)  # windows coalesce
    await eventually(lambda: stored(pool, device_id), lambda n: n == 12)
    assert [a["status"] for a in await alerts(api, device_id)] == ["open"]

    assert (await send(api, me, readings(device_id, [25], 40))).status_code == 202
    cleared = await eventually(lambda: alerts(api, device_id), lambda a: a[0]["status"] == "cleared")
    assert len(cleared) == 1 and cleared[0]["cleared_value"] == 25

    async def alert_events() -> list[str]:
        rows = await pool.fetch(
            "SELECT type FROM notification.events WHERE device_id = $1 AND type LIKE 'Alert%' ORDER BY seq",
            device_id,
        )
        return [r["type"] for r in rows]

    assert await eventually(alert_events, lambda k: len(k) >= 2) == ["AlertRaised", "AlertCleared"]

    series = (
        await api.get(f"/v1/devices/{device_id}/telemetry", params={"bucket": "1h"}, headers=AUTH)
    ).json()
    point = series["points"][0]
    assert (point["count"], point["min"], point["max"]) == (13, 20, 37)
    raw = (await api.get(f"/v1/devices/{device_id}/telemetry", params={"limit": 3}, headers=AUTH)).json()
    assert [p["value"] for p in raw["points"]] == [20, 21, 22]


def future(device_id: str, n: int) -> list[dict[str, Any]]:
    """n readings 10 minutes ahead (each refused)."""
    ahead = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    return [{**r, "ts": ahead} for r in readings(device_id, [1.0] * n)]


BAD = [
    (lambda d: readings(d, [1.0, float("nan")]), ["body", "readings", 1, "value"], 422),
    (lambda d: readings(d, [1.0, float("inf")]), ["body", "readings", 1, "value"], 422),
    (lambda d: [{**readings(d, [1.0])[0], "colour": "red"}], ["body", "readings", 0, "colour"], 422),
    (
        lambda d: [{**readings(d, [1.0])[0], "ts": (datetime.now(UTC) + timedelta(minutes=10)).isoformat()}],
        ["body", "readings", 0, "ts"],
        422,
    ),
    (lambda d: [{**readings(d, [1.0])[0], "ts": "2026-01-01T00:00:00"}], ["body", "readings", 0, "ts"], 422),
    (lambda d: [], ["body", "readings"], 422),
    (lambda d: readings(d, [1.0]) + readings("other", [2.0]), ["body", "readings", 1, "device_id"], 403),
    # another device's reading past the 50 errors shown: still a credential sending for another
    (lambda d: future(d, 50) + readings("other", [2.0]), ["body", "readings", 0, "ts"], 403),
]


@pytest.mark.parametrize(("rows", "loc", "code"), BAD)
async def test_a_bad_batch_names_the_reading_and_stores_nothing(
    rows: Any, loc: list[Any], code: int, api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id, credential = await active_device(api, device_type="sensor")
    batch_id = uuid.uuid4().hex
    response = await send(api, device_auth(credential), rows(device_id), batch_id)
    assert response.status_code == code, response.text
    assert any(p["loc"] == loc for p in response.json()["errors"]), response.json()
    assert await pool.fetchval("SELECT count(*) FROM data.ingest_batches WHERE batch_id = $1", batch_id) == 0


async def test_oversize_and_unauthenticated_batches_are_refused(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api, device_type="sensor")
    too_many = await send(api, device_auth(credential), readings(device_id, [1.0] * 10_001))
    assert too_many.status_code in (413, 422)
    assert (await send(api, {}, readings(device_id, [1.0]))).status_code == 401


async def test_readings_of_devices_that_may_not_send_are_quarantined(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id, _ = await active_device(api, device_type="sensor")
    ghost = f"ghost-{uuid.uuid4().hex[:6]}"
    rows = readings(device_id, [1.0, 2.0]) + readings(ghost, [3.0, 4.0, 5.0])
    assert (await send(api, AUTH, rows)).status_code == 202

    async def held() -> list[dict[str, Any]]:
        body: list[dict[str, Any]] = (
            await api.get("/v1/telemetry/quarantine", params={"device_id": ghost}, headers=AUTH)
        ).json()
        return body

    quarantined = await eventually(held, lambda q: len(q) == 1)
    assert quarantined[0]["reason"] == "unknown" and quarantined[0]["readings"] == 3
    await eventually(lambda: stored(pool, device_id), lambda n: n == 2)
    assert await stored(pool, ghost) == 0
