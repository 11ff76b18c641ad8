"""1-minute and 1-hour rollups of data.readings (count, sum, min, max per series and bucket),
kept longer than the raw readings (a tenant's `rollup_retention_days`).

`add_window` runs inside store_window's transaction, from the window's 1-minute groups
(activities/data_window_groups.py; an hour's bucket is the union of its minutes', by the same
origin): the window is marked stored in the same transaction, so a retried or redelivered
window (found stored) adds nothing twice. Rows are upserted in key order, so two shards adding
to the same buckets wait for each other instead of deadlocking. `read` answers a bucketed read
from them when the bucket and the range line up with a rollup's width.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

ORIGIN = "timestamptz '2000-01-01 00:00:00+00'"
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# (table, width): the widest that divides a bucket is used
TABLES: tuple[tuple[str, timedelta], ...] = (
    ("data.rollups_1h", timedelta(hours=1)),
    ("data.rollups_1m", timedelta(minutes=1)),
)


async def add_window(conn: Any, groups: str = "window_groups") -> None:
    """Add the window's readings to every rollup, from `groups`: one row per series and
    1-minute bucket (n, total, min_value, max_value), a bucket of every rollup's width."""
    for table, width in TABLES:
        await conn.execute(
            f"""INSERT INTO {table} AS r (tenant, device_id, metric, bucket, n, total, min_value, max_value)
                SELECT tenant, device_id, metric, date_bin($1, bucket, {ORIGIN}), sum(n), sum(total),
                       min(min_value), max(max_value)
                FROM {groups} GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
                ON CONFLICT (tenant, device_id, metric, bucket) DO UPDATE SET
                    n = r.n + excluded.n, total = r.total + excluded.total,
                    min_value = least(r.min_value, excluded.min_value),
                    max_value = greatest(r.max_value, excluded.max_value)""",
            width,
        )


def table_for(bucket: timedelta, from_: datetime | None, to: datetime | None) -> str | None:
    """The rollup table that answers buckets of `bucket` over [from_, to) exactly (every rollup
    bucket inside one answer bucket and inside the range), or None (read the raw rows)."""
    for table, width in TABLES:
        if bucket % width:
            continue
        if any(t is not None and (t - _EPOCH) % width for t in (from_, to)):
            continue
        return table
    return None


async def read(
    db: Any,
    table: str,
    tenant: str,
    device_id: str,
    *,
    metric: str | None,
    from_: datetime | None,
    to: datetime | None,
    limit: int,
    bucket: timedelta,
) -> list[dict[str, Any]]:
    """min/max/avg/count per `bucket` and metric from a rollup table, oldest first."""
    rows = await db.fetch(
        f"""SELECT date_bin($7, bucket, {ORIGIN}) AS ts, metric, min(min_value) AS min,
                   max(max_value) AS max, sum(total) / sum(n) AS avg, sum(n) AS count
            FROM {table}
            WHERE tenant = $1 AND device_id = $2 AND ($3::text IS NULL OR metric = $3)
              AND ($4::timestamptz IS NULL OR bucket >= $4) AND ($5::timestamptz IS NULL OR bucket < $5)
            GROUP BY 1, 2 ORDER BY 1, 2 LIMIT $6""",
        tenant,
        device_id,
        metric,
        from_,
        to,
        limit,
        bucket,
    )
    return [dict(r.items()) for r in rows]
