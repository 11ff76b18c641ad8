"""Retention, rollups and export on the real servers: partitions dropped past every tenant's
retention and not before, one tenant's shorter retention leaving another's rows alone, rollups
equal to the raw aggregates (a redelivered window counted once), export formats and scoping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from temporalio.client import Client

from activities import data_facade
from activities.telemetry import DataService
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.retention import RetentionRequest, RetentionResult
from fleetflow.contracts.telemetry import StoreWindow
from fleetflow.db import Pool
from tests.integration.flows import AUTH, active_device
from tests.support import bearer, eventually
from workflows.retention import Retention

NOW = datetime.now(UTC).replace(second=0, microsecond=0)


def rows_at(
    device_id: str, at: datetime, values: list[float], metric: str = "temperature"
) -> list[dict[str, Any]]:
    return [
        {
            "device_id": device_id,
            "ts": (at + timedelta(seconds=7 * i)).isoformat(),
            "metric": metric,
            "value": v,
        }
        for i, v in enumerate(values)
    ]


async def ingest(api: httpx.AsyncClient, auth: dict[str, str], rows: list[dict[str, Any]]) -> str:
    batch_id = uuid.uuid4().hex
    sent = await api.post("/v1/telemetry", json={"batch_id": batch_id, "readings": rows}, headers=auth)
    assert sent.status_code == 202, sent.text
    return batch_id


async def count(pool: Pool, device_id: str, before: datetime | None = None) -> int:
    return int(
        await pool.fetchval(
            """SELECT count(*) FROM data.readings
               WHERE device_id = $1 AND ($2::timestamptz IS NULL OR ts < $2)""",
            device_id,
            before,
        )
    )


async def stored(pool: Pool, device_id: str, n: int) -> None:
    await eventually(lambda: count(pool, device_id), lambda c: c == n)


async def retention(client: Client, now: datetime) -> RetentionResult:
    return await client.execute_workflow(
        Retention.run,
        RetentionRequest(now=now),
        id=f"retention-test-{uuid.uuid4().hex[:8]}",
        task_queue=TaskQueue.ORCHESTRATION.value,
    )


def partition(day: datetime) -> str:
    return f"data.readings_{day:%Y%m%d}"


async def exists(pool: Pool, name: str) -> bool:
    return bool(await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


async def test_partitions_are_dropped_past_retention_and_not_before(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    device_id, _ = await active_device(api)
    old, recent = NOW - timedelta(days=45), NOW - timedelta(days=28)
    await ingest(api, AUTH, rows_at(device_id, old, [1, 2, 3]) + rows_at(device_id, recent, [4, 5]))
    await stored(pool, device_id, 5)

    # fifteen days earlier the old day is 30 days old: not past the 30-day retention
    early = await retention(client, NOW - timedelta(days=15))
    assert await exists(pool, partition(old)) and await count(pool, device_id) == 5
    assert early.data.readings_deleted == 0

    done = await retention(client, NOW)
    assert done.data.partitions_dropped >= 1
    assert not await exists(pool, partition(old))
    assert await exists(pool, partition(recent))
    assert await count(pool, device_id) == 2
    # the hourly rollups outlive the raw rows: the old hour still reads
    hourly = await api.get(
        f"/v1/devices/{device_id}/telemetry",
        params={"bucket": "1h", "from": (old - timedelta(hours=old.hour)).isoformat(), "to": NOW.isoformat()},
        headers=AUTH,
    )
    assert hourly.status_code == 200
    assert sum(p["count"] for p in hourly.json()["points"]) == 5
    # idempotent: again, nothing more goes
    again = await retention(client, NOW)
    assert again.data.readings_deleted == 0 and await count(pool, device_id) == 2


async def test_a_tenants_shorter_retention_leaves_other_tenants_rows_alone(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    tenant = f"short{uuid.uuid4().hex[:6]}"
    short_auth = bearer(tenant)
    put = await api.put(f"/v1/tenants/{tenant}/profile", json={"raw_retention_days": 5}, headers=AUTH)
    assert put.status_code == 200, put.text
    assert put.json()["limits"]["raw_retention_days"] == 5
    mine, _ = await active_device(api, auth=short_auth)
    theirs, _ = await active_device(api)
    ten_days = NOW - timedelta(days=10)
    await ingest(
        api, short_auth, rows_at(mine, ten_days, [1, 2]) + rows_at(mine, NOW - timedelta(days=1), [3])
    )
    await ingest(api, AUTH, rows_at(theirs, ten_days, [1, 2]))
    await stored(pool, mine, 3)
    await stored(pool, theirs, 2)

    done = await retention(client, NOW)
    assert done.data.readings_deleted >= 2
    assert await count(pool, mine) == 1  # the 10-day-old rows of the 5-day tenant are gone
    assert await count(pool, theirs) == 2  # the other tenant keeps its 30 days
    assert await exists(pool, partition(ten_days))  # a shared day is not dropped for one tenant


async def test_rollups_equal_raw_aggregates_and_a_redelivered_window_counts_once(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id, _ = await active_device(api)
    start = NOW.replace(minute=0) - timedelta(hours=3)
    values = [float(v % 17) - 3.5 for v in range(600)]  # 70 minutes at 7 s: three hours' buckets
    first = await ingest(api, AUTH, rows_at(device_id, start, values[:300]))
    await ingest(
        api, AUTH, rows_at(device_id, start + timedelta(seconds=7 * 300), values[300:], "temperature")
    )
    await ingest(api, AUTH, rows_at(device_id, start, [1.0, 2.0], "humidity"))
    await stored(pool, device_id, 602)

    # a window stored again (a retry after the commit, a redelivery): nothing added twice
    window_id = await pool.fetchval("SELECT window_id FROM data.ingest_batches WHERE batch_id = $1", first)
    await DataService(pool).store_window(StoreWindow(window_id=window_id, quarantine=[]))

    span = {"from": start.isoformat(), "to": (start + timedelta(hours=3)).isoformat()}
    for bucket, width in (
        ("1h", timedelta(hours=1)),
        ("5m", timedelta(minutes=5)),
        ("1m", timedelta(minutes=1)),
    ):
        got = await api.get(
            f"/v1/devices/{device_id}/telemetry", params={**span, "bucket": bucket}, headers=AUTH
        )
        assert got.status_code == 200
        raw = await pool.fetch(
            """SELECT date_bin($2::interval, ts, timestamptz '2000-01-01 00:00:00+00') AS ts, metric,
                      min(value), max(value), avg(value), count(*)
               FROM data.readings WHERE device_id = $1 GROUP BY 1, 2 ORDER BY 1, 2""",
            device_id,
            width,
        )
        points = got.json()["points"]
        assert len(points) == len(raw)
        for p, r in zip(points, raw, strict=True):
            assert datetime.fromisoformat(p["ts"]) == r["ts"] and p["metric"] == r["metric"]
            assert (p["min"], p["max"], p["count"]) == (r["min"], r["max"], r["count"])
            assert abs(p["avg"] - r["avg"]) < 1e-9
    hourly = await pool.fetchval(
        "SELECT sum(n) FROM data.rollups_1h WHERE device_id = $1 AND tenant = 'acme'", device_id
    )
    assert hourly == 602


async def test_export_streams_csv_and_ndjson_of_the_callers_tenant_only(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id, _ = await active_device(api)
    start = NOW - timedelta(hours=2)
    await ingest(
        api, AUTH, rows_at(device_id, start, [1.5, -2.0, 1e100]) + rows_at(device_id, start, [7], "a.b")
    )
    await stored(pool, device_id, 4)
    url = f"/v1/devices/{device_id}/telemetry/export"

    ndjson = await api.get(url, params={"format": "ndjson", "from": start.isoformat()}, headers=AUTH)
    assert ndjson.status_code == 200 and ndjson.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in ndjson.text.splitlines()]
    assert [(x["metric"], x["value"]) for x in lines] == [
        ("a.b", 7),
        ("temperature", 1.5),
        ("temperature", -2.0),
        ("temperature", 1e100),
    ]
    csv = await api.get(url, params={"format": "csv"}, headers=AUTH)
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[0] == "ts,metric,value"
    assert csv.text.splitlines()[1].endswith(",a.b,7.0") and len(csv.text.splitlines()) == 5
    # a window that holds nothing: only the header
    empty = await api.get(url, params={"format": "csv", "to": start.isoformat()}, headers=AUTH)
    assert empty.text == "ts,metric,value\n"

    # another tenant's token does not see this device; bad parameters name the field
    assert (await api.get(url, headers=bearer("globex"))).status_code == 404
    bad = await api.get(url, params={"format": "xml"}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["query", "format"]
    naive = await api.get(url, params={"from": "2026-01-01T00:00:00"}, headers=AUTH)
    assert naive.status_code == 422


async def test_old_delivered_events_and_dead_letters_go_pending_ones_stay(pool: Pool, client: Client) -> None:
    tenant = f"ev{uuid.uuid4().hex[:6]}"
    sub = f"sub-{tenant}"
    await pool.execute(
        """INSERT INTO notification.subscriptions (subscription_id, tenant, url, event_types, secret,
               max_attempts, backoff_s, max_backoff_s, created_by)
           VALUES ($1, $2, 'http://127.0.0.1:9/', '{}', 'x', 3, 1, 1, 'test')""",
        sub,
        tenant,
    )
    old = NOW - timedelta(days=40)
    seqs = {}
    for name, status in (
        ("delivered", "delivered"),
        ("dead", "dead"),
        ("pending", "pending"),
        ("young", None),
    ):
        seqs[name] = await pool.fetchval(
            """INSERT INTO notification.events (event_id, tenant, type, occurred_at, actor)
               VALUES ($1, $2, 'Test', $3, 'test') RETURNING seq""",
            f"{tenant}-{name}",
            tenant,
            NOW if name == "young" else old,
        )
        if status is not None:
            await pool.execute(
                """INSERT INTO notification.deliveries (subscription_id, event_seq, status, updated_at)
                   VALUES ($1, $2, $3, $4)""",
                sub,
                seqs[name],
                status,
                old,
            )
    try:
        done = await retention(client, NOW)
        assert done.notification.events_deleted >= 2 and done.notification.dead_letters_deleted >= 1
        left = {
            r["event_id"]
            for r in await pool.fetch("SELECT event_id FROM notification.events WHERE tenant = $1", tenant)
        }
        # an event still waiting for a delivery is kept whatever its age: nothing accepted is lost
        assert left == {f"{tenant}-pending", f"{tenant}-young"}
        statuses = await pool.fetch(
            """SELECT d.status FROM notification.deliveries d WHERE d.subscription_id = $1""", sub
        )
        assert [r["status"] for r in statuses] == ["pending"]
    finally:
        await pool.execute("DELETE FROM notification.subscriptions WHERE subscription_id = $1", sub)
        await pool.execute("DELETE FROM notification.events WHERE tenant = $1", tenant)


async def test_export_of_the_same_device_id_in_two_tenants_shows_each_its_own(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    globex = bearer("globex")
    device_id, _ = await active_device(api)
    await active_device(api, auth=globex, device_id=device_id)
    await ingest(api, AUTH, rows_at(device_id, NOW - timedelta(minutes=30), [1.0]))
    await ingest(api, globex, rows_at(device_id, NOW - timedelta(minutes=30), [2.0, 3.0]))
    await stored(pool, device_id, 3)
    url = f"/v1/devices/{device_id}/telemetry/export"
    mine = await api.get(url, params={"format": "ndjson"}, headers=AUTH)
    theirs = await api.get(url, params={"format": "ndjson"}, headers=globex)
    assert [json.loads(x)["value"] for x in mine.text.splitlines()] == [1.0]
    assert [json.loads(x)["value"] for x in theirs.text.splitlines()] == [2.0, 3.0]
    hourly = await api.get(f"/v1/devices/{device_id}/telemetry", params={"bucket": "1h"}, headers=globex)
    assert sum(p["count"] for p in hourly.json()["points"]) == 2


async def test_rollups_are_kept_as_long_as_the_raw_rows_whatever_the_profile_says(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    """A profile with rollups shorter than its raw retention: an hour-aligned read (answered
    from the rollups only) still sees the raw rows it keeps."""
    tenant = f"roll{uuid.uuid4().hex[:6]}"
    auth = bearer(tenant)
    put = await api.put(f"/v1/tenants/{tenant}/profile", json={"rollup_retention_days": 3}, headers=AUTH)
    assert put.status_code == 200, put.text
    device_id, _ = await active_device(api, auth=auth)
    ten_days = NOW.replace(minute=0) - timedelta(days=10)
    await ingest(api, auth, rows_at(device_id, ten_days, [1, 2, 3]))
    await stored(pool, device_id, 3)

    await retention(client, NOW)
    assert await count(pool, device_id) == 3  # 10 days: within the raw 30
    hourly = await api.get(
        f"/v1/devices/{device_id}/telemetry",
        params={"bucket": "1h", "from": ten_days.isoformat(), "to": NOW.replace(minute=0).isoformat()},
        headers=auth,
    )
    assert hourly.status_code == 200
    assert sum(p["count"] for p in hourly.json()["points"]) == 3


async def test_readings_of_an_old_poison_pill_batch_go_with_it(
    pool: Pool, client: Client, workers: None
) -> None:
    """A quarantined (poison-pill) batch's readable rows are kept under its window, which is
    never stored: they age out with the batch rather than staying for ever."""
    tenant = f"pp{uuid.uuid4().hex[:6]}"
    window_id = f"w-{tenant}/a"
    await pool.execute(
        """INSERT INTO data.ingest_batches (tenant, batch_id, bucket, readings, device_ids, status,
               window_id, reason, quarantined_at)
           VALUES ($1, 'b1', 0, 1, '{d1}', 'quarantined', $2, 'poison', $3)""",
        tenant,
        window_id,
        NOW - timedelta(days=40),
    )
    await pool.execute(
        """INSERT INTO data.quarantined_readings VALUES ($1, 'd1', 'temperature', $2, 1.0, 'poison',
               'b1', $3)""",
        tenant,
        NOW - timedelta(days=40),
        window_id,
    )
    done = await retention(client, NOW)
    assert done.data.quarantined_deleted >= 1
    assert (
        await pool.fetchval("SELECT count(*) FROM data.quarantined_readings WHERE tenant = $1", tenant) == 0
    )
    assert await pool.fetchval("SELECT count(*) FROM data.ingest_batches WHERE tenant = $1", tenant) == 0


async def test_an_export_whose_reader_stalls_has_its_transaction_ended_by_the_server(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    """A client that stops reading must not hold a connection and a transaction (and with them
    retention's DROP of the partitions read) for ever: the server ends the idle transaction."""
    device_id, _ = await active_device(api)
    await ingest(api, AUTH, rows_at(device_id, NOW - timedelta(minutes=20), [float(v) for v in range(5)]))
    await stored(pool, device_id, 5)
    conn = await pool.acquire()
    pid = conn.get_server_pid()
    transaction = conn.transaction(readonly=True)
    await transaction.start()
    try:
        rows = data_facade.export_readings(conn, "acme", device_id, None, None, idle_s=1)
        await anext(rows)
        await asyncio.sleep(2.5)  # the reader stalls
        sessions = await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
        assert sessions == 0, "the stalled export's session still holds its transaction"
    finally:
        with contextlib.suppress(Exception):
            await transaction.rollback()
        with contextlib.suppress(Exception):
            await pool.release(conn)
