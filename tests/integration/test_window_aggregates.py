"""A stored window's aggregates (data.window_stats, the 1-minute and 1-hour rollups) against
plain GROUP BYs over the readings it stored, for windows over several hours, two tenants with
the same device ids, and readings outside the bounds that must count nowhere.

The batches are written and stored in one transaction of the test's own (store_window's
transaction, `_store`), so no shard or supervisor can claim or reclaim them half-way.
"""

from __future__ import annotations

import math
import random
import statistics
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from activities import telemetry
from activities.telemetry_accept import ReadingColumns, csv_payload
from fleetflow.contracts.limits import MAX_ABS_VALUE
from fleetflow.contracts.telemetry import Stored, StoreWindow
from fleetflow.db import Pool

TENANTS = ("acme", "globex")
NOW = datetime.now(UTC).replace(microsecond=0)
Reading = tuple[str, str, str, datetime, float]  # tenant, device, metric, ts, value


async def _store(pool: Pool, window_id: str, readings: list[Reading], csv_extra: dict[str, bytes]) -> Stored:
    """Claim `readings` (a batch per tenant and device, plus `csv_extra`: raw CSV lines per tenant,
    as a batch acknowledged before the bounds could write them) into a window and store it."""
    batches: dict[tuple[str, str], list[Reading]] = {}
    for r in readings:
        batches.setdefault((r[0], r[1]), []).append(r)
    payloads: list[tuple[str, str, bytes]] = []
    for (tenant, _device), rows in batches.items():
        batch_id = uuid.uuid4().hex
        columns = ReadingColumns(
            batch_id, [r[1] for r in rows], [r[3] for r in rows], [r[2] for r in rows], [r[4] for r in rows]
        )
        payloads.append((tenant, batch_id, csv_payload(tenant, columns)))
    for tenant, lines in csv_extra.items():
        batch_id = uuid.uuid4().hex
        payloads.append((tenant, batch_id, lines.replace(b"BATCH", batch_id.encode())))
    days = sorted({r[3].date() for r in readings} | {NOW.date()})
    async with pool.acquire() as conn:
        await telemetry._create_partitions(conn, days)
        async with conn.transaction():
            for tenant, batch_id, payload in payloads:
                await conn.execute(
                    """INSERT INTO data.ingest_batches (tenant, writer, batch_id, bucket, readings,
                           device_ids, payload, status, window_id)
                       VALUES ($1, 'token:test', $2, 0, $3, '{}', $4, 'claimed', $5)""",
                    tenant,
                    batch_id,
                    payload.count(b"\n"),
                    payload,
                    window_id,
                )
            return await telemetry._store(conn, StoreWindow(window_id=window_id))


def _series(devices: list[str], start: datetime, seed: int, step_s: int) -> list[Reading]:
    """Readings of every tenant x device x metric over 2.5 hours (minutes with one, two or no
    reading), shuffled, with values that make the variance's rounding matter."""
    rng = random.Random(seed)
    readings = [
        (tenant, device, metric, start + timedelta(seconds=step_s * i, microseconds=t + 10 * d), value)
        for t, tenant in enumerate(TENANTS)
        for d, device in enumerate(devices)
        for metric in ("temperature", "humidity")
        for i in range(9000 // step_s)
        for value in [1e6 + rng.uniform(-1, 1) * (t + 1) + (d * 3.25 if metric == "humidity" else 0)]
    ]
    rng.shuffle(readings)
    return readings


def _bad_lines(tenant: str, device: str, first: datetime) -> bytes:
    """CSV lines outside the bounds: a second before the series' first reading (which would
    change its first value), a huge value, NaN, a ts older than the bounds, one too far ahead."""
    before = (first - timedelta(seconds=1)).isoformat()
    lines = [
        f"{tenant},BATCH,{device},temperature,{before},{MAX_ABS_VALUE * 10!r}",
        f"{tenant},BATCH,{device},temperature,{before},NaN",
        f"{tenant},BATCH,{device},temperature,2001-01-01T00:00:00+00:00,5.0",
        f"{tenant},BATCH,{device},temperature,{(NOW + timedelta(days=2)).isoformat()},5.0",
        f"{tenant},BATCH,{device},pressure,{before},-1e300",  # a series with no reading in bounds
    ]
    return ("\n".join(lines) + "\n").encode()


async def _raw_series(pool: Pool, devices: list[str]) -> dict[tuple[str, str, str], Any]:
    rows = await pool.fetch(
        """SELECT tenant, device_id, metric, count(*) AS n, avg(value) AS mean, var_pop(value) AS var,
                  min(value) AS min_value, max(value) AS max_value, min(ts) AS first_ts, max(ts) AS last_ts
           FROM data.readings WHERE device_id = ANY($1) GROUP BY 1, 2, 3""",
        devices,
    )
    return {(r["tenant"], r["device_id"], r["metric"]): r for r in rows}


async def _assert_rollups_equal_raw(pool: Pool, devices: list[str]) -> None:
    for table, width in (("data.rollups_1m", "1 minute"), ("data.rollups_1h", "1 hour")):
        rollups = await pool.fetch(
            f"""SELECT tenant, device_id, metric, bucket, n, total, min_value, max_value FROM {table}
                WHERE device_id = ANY($1) ORDER BY 1, 2, 3, 4""",
            devices,
        )
        raw = await pool.fetch(
            f"""SELECT tenant, device_id, metric,
                       date_bin('{width}', ts, timestamptz '2000-01-01 00:00:00+00') AS bucket,
                       count(*) AS n, sum(value) AS total, min(value) AS min_value, max(value) AS max_value
                FROM data.readings WHERE device_id = ANY($1) GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4""",
            devices,
        )
        assert [tuple(r.values())[:5] for r in rollups] == [tuple(r.values())[:5] for r in raw], table
        for got, want in zip(rollups, raw, strict=True):
            assert (got["min_value"], got["max_value"]) == (want["min_value"], want["max_value"])
            assert got["total"] == pytest.approx(want["total"], rel=1e-12)
        if width == "1 hour":
            assert len({r["bucket"] for r in raw}) >= 3  # the window spans several hours


def _expected(readings: list[Reading]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """A window's per-series stats computed in Python from what it stored."""
    by_series: dict[tuple[str, str, str], list[Reading]] = {}
    for r in readings:
        by_series.setdefault(r[:3], []).append(r)
    expected = {}
    for key, rows in by_series.items():
        values = [r[4] for r in rows]
        first, last = min(rows, key=lambda r: r[3]), max(rows, key=lambda r: r[3])
        expected[key] = {
            "n": len(rows),
            "mean": statistics.fmean(values),
            "var": statistics.pvariance(values),
            "min_value": min(values),
            "max_value": max(values),
            "first_ts": first[3],
            "first_value": first[4],
            "last_ts": last[3],
            "last_value": last[4],
        }
    return expected


def _assert_stats(
    got: dict[tuple[str, str, str], Any], want: dict[tuple[str, str, str], dict[str, Any]]
) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        for field in ("n", "min_value", "max_value", "first_ts", "first_value", "last_ts", "last_value"):
            assert g[field] == w[field], (key, field)
        assert g["mean"] == pytest.approx(w["mean"], rel=1e-12)
        # values near 1e6 that differ by about 1: a sum of squares would lose most digits here
        assert g["var"] == pytest.approx(w["var"], rel=1e-9), key


async def test_window_stats_and_rollups_equal_plain_group_bys_and_exclude_readings_out_of_bounds(
    pool: Pool,
) -> None:
    devices = [f"agg-{uuid.uuid4().hex[:8]}", f"agg-{uuid.uuid4().hex[:8]}"]
    start = NOW.replace(second=0) - timedelta(hours=3)
    first_window = f"test-aggregates/{uuid.uuid4().hex}/1"
    readings = _series(devices, start, seed=1, step_s=37)
    bad = {t: _bad_lines(t, devices[0], start) for t in TENANTS}
    stored = await _store(pool, first_window, readings, bad)

    assert stored.stored == len(readings)
    assert stored.quarantined == 10
    assert stored.by_tenant == {t: {"stored": len(readings) // 2, "quarantined": 5} for t in TENANTS}
    reasons = await pool.fetch(
        """SELECT tenant, split_part(reason, ' (', 1) AS reason, count(*) AS n FROM data.quarantined_readings
           WHERE window_id = $1 GROUP BY 1, 2 ORDER BY 1, 2""",
        first_window,
    )
    assert [tuple(r.values()) for r in reasons] == [
        (t, reason, n) for t in TENANTS for reason, n in (("ts out of bounds", 2), ("value out of bounds", 3))
    ]
    stats = {
        (r["tenant"], r["device_id"], r["metric"]): r
        for r in await pool.fetch("SELECT * FROM data.window_stats WHERE window_id = $1", first_window)
    }
    _assert_stats(stats, _expected(readings))
    raw = await _raw_series(pool, devices)  # the readings stored: this window's only
    assert set(raw) == set(stats)
    for key, r in raw.items():
        s = stats[key]
        assert (s["n"], s["min_value"], s["max_value"]) == (r["n"], r["min_value"], r["max_value"])
        assert (s["first_ts"], s["last_ts"]) == (r["first_ts"], r["last_ts"])
        assert s["mean"] == pytest.approx(r["mean"], rel=1e-12)
        assert s["var"] == pytest.approx(r["var"], rel=1e-9)
    await _assert_rollups_equal_raw(pool, devices)

    # a second window into the same minutes and hours: the rollups add up, its stats are its own
    second_window = f"test-aggregates/{uuid.uuid4().hex}/2"
    more = _series(devices, start + timedelta(seconds=5), seed=2, step_s=53)
    assert (await _store(pool, second_window, more, {})).stored == len(more)
    stats = {
        (r["tenant"], r["device_id"], r["metric"]): r
        for r in await pool.fetch("SELECT * FROM data.window_stats WHERE window_id = $1", second_window)
    }
    _assert_stats(stats, _expected(more))
    await _assert_rollups_equal_raw(pool, devices)
    assert sum(r["n"] for r in (await _raw_series(pool, devices)).values()) == len(readings) + len(more)


async def test_a_window_of_readings_all_out_of_bounds_stores_nothing_and_quarantines_them(pool: Pool) -> None:
    device = f"agg-{uuid.uuid4().hex[:8]}"
    window_id = f"test-aggregates/{uuid.uuid4().hex}/1"
    stored = await _store(pool, window_id, [], {"acme": _bad_lines("acme", device, NOW - timedelta(hours=1))})
    assert (stored.stored, stored.quarantined) == (0, 5)
    assert stored.by_tenant == {"acme": {"stored": 0, "quarantined": 5}}
    for table in ("data.readings", "data.rollups_1m", "data.rollups_1h"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE device_id = $1", device) == 0
    assert await pool.fetchval("SELECT count(*) FROM data.window_stats WHERE window_id = $1", window_id) == 0
    # stored again (a retry): the same answer, nothing twice
    async with pool.acquire() as conn, conn.transaction():
        again = await telemetry._store(conn, StoreWindow(window_id=window_id))
    assert (again.stored, again.quarantined) == (0, 5)
    assert (
        await pool.fetchval("SELECT count(*) FROM data.quarantined_readings WHERE window_id = $1", window_id)
        == 5
    )


async def test_values_at_the_bound_are_stored_and_just_past_it_quarantined(pool: Pool) -> None:
    device = f"agg-{uuid.uuid4().hex[:8]}"
    at = NOW - timedelta(minutes=30)
    edge = [
        ("acme", device, "edge", at + timedelta(seconds=i), v)
        for i, v in enumerate((MAX_ABS_VALUE, -MAX_ABS_VALUE))
    ]
    past = math.nextafter(MAX_ABS_VALUE, math.inf)
    lines = "".join(f"acme,BATCH,{device},edge,{at.isoformat()},{v!r}\n" for v in (past, -past))
    window_id = f"test-aggregates/{uuid.uuid4().hex}/1"
    stored = await _store(pool, window_id, edge, {"acme": lines.encode()})
    assert (stored.stored, stored.quarantined) == (2, 2)
    row = await pool.fetchrow("SELECT * FROM data.window_stats WHERE window_id = $1", window_id)
    assert row is not None
    assert (row["n"], row["min_value"], row["max_value"]) == (2, -MAX_ABS_VALUE, MAX_ABS_VALUE)
    assert (row["first_value"], row["last_value"]) == (MAX_ABS_VALUE, -MAX_ABS_VALUE)
    assert row["var"] == pytest.approx(MAX_ABS_VALUE**2)
