"""The data service's read facade: what other services and the API may ask of the `data`
schema without an activity. One query per call (several of these run on the ingestion path);
`db` is a pool or a connection of the caller's. Rows come back as plain dicts: the caller
shapes its own views.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from activities import data_rollups
from fleetflow.metrics import StateGauge

PREFETCH = 2000


async def window_stats(db: Any, window_id: str) -> list[Any]:
    """A stored window's aggregates, one row (a mapping) per (tenant, device, metric)."""
    return list(await db.fetch("SELECT * FROM data.window_stats WHERE window_id = $1", window_id))


async def window_devices(db: Any, window_id: str) -> list[tuple[str, str]]:
    """(tenant, device id) of every device with readings in a claimed window's batches."""
    rows = await db.fetch(
        """SELECT DISTINCT tenant, unnest(device_ids) AS device_id
           FROM data.ingest_batches WHERE window_id = $1""",
        window_id,
    )
    return [(r["tenant"], r["device_id"]) for r in rows]


async def stored_window(db: Any, window_id: str) -> dict[str, Any] | None:
    """`by_tenant` (counts per tenant) and `stored_at` of a stored window; None before."""
    row = await db.fetchrow("SELECT by_tenant, stored_at FROM data.windows WHERE window_id = $1", window_id)
    return None if row is None else dict(row.items())


async def quarantined_in_window(db: Any, window_id: str) -> list[dict[str, Any]]:
    """The batches of a window set aside as poison pills (tenant, batch_id, readings, reason,
    quarantined_at, and device_id when the batch held one device), by tenant and batch id."""
    rows = await db.fetch(
        """SELECT tenant, batch_id, readings, reason, quarantined_at,
                  CASE WHEN cardinality(device_ids) = 1 THEN device_ids[1] END AS device_id
           FROM data.ingest_batches WHERE window_id = $1 AND status = 'quarantined'
           ORDER BY tenant, batch_id""",
        window_id,
    )
    return [dict(r.items()) for r in rows]


async def readings(
    db: Any,
    tenant: str,
    device_id: str,
    *,
    metric: str | None,
    from_: datetime | None,
    to: datetime | None,
    limit: int,
    bucket: timedelta | None = None,
) -> list[dict[str, Any]]:
    """A device's readings oldest first (ts, metric, value), or with `bucket` min/max/avg/count
    per time bucket and metric: from the 1-hour or 1-minute rollups when the bucket and the
    range line up with their width (older than the raw retention, only they remain)."""
    table = None if bucket is None else data_rollups.table_for(bucket, from_, to)
    if table is not None and bucket is not None:
        return await data_rollups.read(
            db, table, tenant, device_id, metric=metric, from_=from_, to=to, limit=limit, bucket=bucket
        )
    args = (tenant, device_id, metric, from_, to, limit)
    where = """tenant = $1 AND device_id = $2 AND ($3::text IS NULL OR metric = $3)
               AND ($4::timestamptz IS NULL OR ts >= $4) AND ($5::timestamptz IS NULL OR ts < $5)"""
    if bucket is None:
        rows = await db.fetch(
            f"SELECT ts, metric, value FROM data.readings WHERE {where} ORDER BY ts, metric LIMIT $6", *args
        )
    else:
        rows = await db.fetch(
            f"""SELECT date_bin($7, ts, timestamptz '2000-01-01') AS ts, metric,
                       min(value) AS min, max(value) AS max, avg(value) AS avg, count(*) AS count
                FROM data.readings WHERE {where} GROUP BY 1, 2 ORDER BY 1, 2 LIMIT $6""",
            *args,
            bucket,
        )
    return [dict(r.items()) for r in rows]


async def export_readings(
    conn: Any, tenant: str, device_id: str, from_: datetime | None, to: datetime | None, idle_s: int = 30
) -> AsyncIterator[Any]:
    """A device's raw readings (ts, metric, value) oldest first through a server-side cursor:
    `conn` must be in a transaction; rows come PREFETCH at a time, never all at once. A reader
    that stops asking for rows for `idle_s` has its transaction ended by the server (it would
    hold its connection, and block retention's DROP of the partitions read, for ever)."""
    await conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = '{int(idle_s)}s'")
    async for row in conn.cursor(
        """SELECT ts, metric, value FROM data.readings
           WHERE tenant = $1 AND device_id = $2
             AND ($3::timestamptz IS NULL OR ts >= $3) AND ($4::timestamptz IS NULL OR ts < $4)
           ORDER BY ts, metric""",
        tenant,
        device_id,
        from_,
        to,
        prefetch=PREFETCH,
    ):
        yield row


async def quarantined_readings(db: Any, tenant: str, device_id: str | None) -> list[dict[str, Any]]:
    """The tenant's quarantined readings counted by device and reason (device_id, reason,
    readings, last_ts); at most 1000 rows."""
    rows = await db.fetch(
        """SELECT device_id, reason, count(*) AS readings, max(ts) AS last_ts
           FROM data.quarantined_readings WHERE tenant = $1 AND ($2::text IS NULL OR device_id = $2)
           GROUP BY device_id, reason ORDER BY device_id, reason LIMIT 1000""",
        tenant,
        device_id,
    )
    return [dict(r.items()) for r in rows]


async def quarantined_batches(db: Any, tenant: str) -> list[dict[str, Any]]:
    """The tenant's poison-pill batches, newest first (batch_id, readings, reason,
    quarantined_at); at most 1000."""
    rows = await db.fetch(
        """SELECT batch_id, readings, reason, quarantined_at FROM data.ingest_batches
           WHERE tenant = $1 AND status = 'quarantined' ORDER BY quarantined_at DESC LIMIT 1000""",
        tenant,
    )
    return [dict(r.items()) for r in rows]


async def ingestion_status(db: Any) -> list[dict[str, Any]]:
    """The backlog and the last minute's throughput (the status screen)."""
    rows = await db.fetch(
        """SELECT
        (SELECT count(*) FROM data.ingest_batches WHERE status = 'pending') AS pending_batches,
        (SELECT coalesce(sum(readings), 0) FROM data.ingest_batches WHERE status = 'pending')
            AS pending_readings,
        (SELECT extract(epoch FROM now() - min(received_at)) FROM data.ingest_batches
            WHERE status = 'pending') AS oldest_s,
        (SELECT coalesce(sum(stored), 0) FROM data.windows WHERE stored_at > now() - interval '1 minute')
            AS stored_last_minute,
        (SELECT coalesce(sum(quarantined), 0) FROM data.windows
            WHERE stored_at > now() - interval '1 minute') AS quarantined_last_minute""",
        timeout=5,
    )
    return [dict(r.items()) for r in rows]


GAUGES: tuple[StateGauge, ...] = (
    StateGauge(
        "fleetflow.ingest.backlog",
        "{reading}",
        "Acknowledged readings waiting to be claimed",
        None,
        "SELECT coalesce(sum(readings), 0) FROM data.ingest_batches WHERE status = 'pending'",
    ),
)
