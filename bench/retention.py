"""Retention and rollups: disk use under a simulated month, and a year of hourly points
(rollups) beside an hour of raw points.

    python -m bench.retention [--days 40] [--interval-s 10]

The retention clock is moved, not waited for: the API accepts readings up to 366 days old,
so simulated day k's readings carry timestamps of the real day `now - days + k`, and after
each simulated day the Retention workflow runs with `now` set to that day's end (its input
`now`, the same override tests use). Disk use is PostgreSQL's (pg_database_size) after each
simulated day's retention run; `raw_mb` is data.readings' partitions alone, `rollup_mb` the
two rollup tables (kept a year: they grow by about 1/(readings per minute) of raw a day).

A second device gets a reading every 5 minutes over the past 365 days; retention drops its
raw rows older than 30 days, and `year_hourly_ms` is the median time of
`GET /v1/devices/{id}/telemetry?bucket=1h` over that year (8,760 points from the hourly
rollups) beside `hour_raw_ms`, the median time of the raw readings of the main device's last
hour (`GET /v1/devices/{id}/telemetry?from=...`, 360 points at 10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from activities import data_facade
from bench.stack import Stack, say, stack
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.retention import RetentionRequest, RetentionResult
from fleetflow.db import create_pool
from workflows.retention import Retention

BATCH = 10_000


async def new_device(s: Stack) -> str:
    device_id = f"ret-{uuid.uuid4().hex[:8]}"
    body = {"devices": [{"device_id": device_id, "device_type": "sensor"}]}
    accepted = (await s.api.post("/v1/devices:bulk", json=body, headers=s.headers)).json()
    await s.client.get_workflow_handle(accepted["workflow_id"]).result()
    return device_id


async def send(s: Stack, device_id: str, start: datetime, end: datetime, step: timedelta) -> int:
    rows: list[dict[str, Any]] = []
    sent = 0
    at = start
    while at < end:
        rows.append(
            {"device_id": device_id, "ts": at.isoformat(), "metric": "temperature", "value": (sent % 97) / 3}
        )
        sent += 1
        at += step
        if len(rows) == BATCH:
            await _post(s, rows)
            rows = []
    if rows:
        await _post(s, rows)
    return sent


async def _post(s: Stack, rows: list[dict[str, Any]]) -> None:
    body = {"batch_id": uuid.uuid4().hex, "readings": rows}
    while True:
        response = await s.api.post("/v1/telemetry", json=body, headers=s.headers)
        if response.status_code != 429:
            response.raise_for_status()
            return
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))


async def drained(pool: Any, expected: int) -> None:
    deadline = time.monotonic() + 600
    stored = 0
    while time.monotonic() < deadline:
        stored = await pool.fetchval("SELECT coalesce(sum(stored), 0) FROM data.windows")
        if stored >= expected:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{stored} of {expected} readings stored after 10 minutes")


async def retention(s: Stack, now: datetime) -> RetentionResult:
    return await s.client.execute_workflow(
        Retention.run,
        RetentionRequest(now=now),
        id=f"retention-bench-{uuid.uuid4().hex[:8]}",
        task_queue=TaskQueue.ORCHESTRATION.value,
    )


async def sizes(pool: Any) -> dict[str, float]:
    row = await pool.fetchrow(
        """SELECT pg_database_size(current_database()) AS db,
                  coalesce((SELECT sum(pg_total_relation_size(i.inhrelid)) FROM pg_inherits i
                            WHERE i.inhparent = 'data.readings'::regclass), 0) AS raw,
                  pg_total_relation_size('data.rollups_1m') + pg_total_relation_size('data.rollups_1h')
                      AS rollups"""
    )
    mb = 1024 * 1024
    return {k: round(float(row[k]) / mb, 1) for k in ("db", "raw", "rollups")}


async def median_ms(s: Stack, url: str, params: dict[str, str], runs: int) -> tuple[float, int]:
    times, points = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        response = await s.api.get(url, params=params, headers=s.headers)
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        points = len(response.json()["points"])
    return round(statistics.median(times), 1), points


async def median_facade(
    pool: Any, device_id: str, from_: datetime, to: datetime, bucket: timedelta | None, runs: int
) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await data_facade.readings(
            pool, "bench", device_id, metric=None, from_=from_, to=to, limit=10_000, bucket=bucket
        )
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


async def main(days: int, interval_s: float, runs: int) -> dict[str, Any]:
    async with stack() as s:
        assert s.settings.database_url
        pool = await create_pool(s.settings.database_url, size=2)
        unlimited = {
            "readings_per_s": 0,
            "device_readings_per_s": 0,
            "requests_per_s": 0,
            "device_requests_per_s": 0,
        }
        (await s.api.put("/v1/tenants/bench/profile", json=unlimited, headers=s.headers)).raise_for_status()
        device_id, yearly = await new_device(s), await new_device(s)
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        base = now - timedelta(days=days)
        step = timedelta(seconds=interval_s)
        total, by_day, results = 0, [], []
        before: dict[str, float] | None = None
        started = time.perf_counter()
        for k in range(days):
            day_start, day_end = base + timedelta(days=k), base + timedelta(days=k + 1)
            total += await send(s, device_id, day_start, day_end, step)
            await drained(pool, total)
            pre = await sizes(pool)
            result = await retention(s, day_end)
            if result.data.partitions_dropped and before is None:
                before = pre
            post = await sizes(pool)
            by_day.append(post["db"])
            results.append(result.data.partitions_dropped)
            say(
                f"day {k + 1}/{days}: {total} readings, db {post['db']} MB (raw {post['raw']}, "
                f"rollups {post['rollups']}), dropped {result.data.partitions_dropped}"
            )
        ingest_s = time.perf_counter() - started
        after = await sizes(pool)

        say("a year of readings every 5 minutes for a second device ...")
        year_start = now - timedelta(days=365)
        total += await send(s, yearly, year_start, now, timedelta(minutes=5))
        await drained(pool, total)
        await retention(s, now)
        say("timing reads ...")
        year_hourly_ms, year_points = await median_ms(
            s,
            f"/v1/devices/{yearly}/telemetry",
            {"bucket": "1h", "from": year_start.isoformat(), "to": now.isoformat(), "limit": "10000"},
            runs,
        )
        hour_raw_ms, hour_points = await median_ms(
            s,
            f"/v1/devices/{device_id}/telemetry",
            {"from": (now - timedelta(hours=1)).isoformat(), "to": now.isoformat(), "limit": "10000"},
            runs,
        )
        # the same reads at the read facade (the SQL alone, no HTTP and JSON of the points), and a
        # month of hourly buckets from the rollups beside the same month from the raw rows (a
        # range one second off the hour cannot use the rollups)
        facade = {
            "year_hourly_sql_ms": await median_facade(
                pool, yearly, year_start, now, timedelta(hours=1), runs
            ),
            "hour_raw_sql_ms": await median_facade(
                pool, device_id, now - timedelta(hours=1), now, None, runs
            ),
            "month_hourly_rollup_sql_ms": await median_facade(
                pool, device_id, now - timedelta(days=29), now, timedelta(hours=1), runs
            ),
            "month_hourly_raw_sql_ms": await median_facade(
                pool, device_id, now - timedelta(days=29, seconds=-1), now, timedelta(hours=1), runs
            ),
        }
        await pool.close()
        before = before or after
        return {
            "bench": "retention",
            "simulated_days": days,
            "interval_s": interval_s,
            "readings": total,
            "ingest_s": round(ingest_s, 1),
            "db_mb_before": before["db"],
            "db_mb_after_retention": after["db"],
            "raw_mb_before": before["raw"],
            "raw_mb_after_retention": after["raw"],
            "rollup_mb_after": after["rollups"],
            "db_mb_by_day": by_day,
            "partitions_dropped": sum(results),
            "year_hourly_ms": year_hourly_ms,
            "year_hourly_points": year_points,
            "hour_raw_ms": hour_raw_ms,
            "hour_raw_points": hour_points,
            **facade,
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--days", type=int, default=40, help="simulated days (raw retention is 30)")
    parser.add_argument("--interval-s", type=float, default=10.0, help="seconds between readings")
    parser.add_argument("--runs", type=int, default=20, help="timed reads of each kind")
    args = parser.parse_args()
    result = asyncio.run(main(args.days, args.interval_s, args.runs))
    print(json.dumps(result), flush=True)
    os._exit(0)
