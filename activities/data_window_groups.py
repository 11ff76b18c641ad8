"""A window's readings aggregated once: store_window's one pass over its `incoming` rows.

`group` reads `incoming` once into the small temp table `window_groups`, one row per (tenant,
device, metric, 1-minute bucket): count, sum, min, max, the sum of squared deviations from the
group's mean (m2), the first and last ts. Readings outside the bounds get a group of their own
per series with a NULL bucket (and no aggregates), so finding none costs no extra pass; when
there are some, the caller quarantines them and `drop_out_of_bounds` drops their groups. The
window's per-series stats (`add_stats`) and the rollups (data_rollups.add_window) are then
derived from these groups, not from the readings again.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from activities.data_rollups import ORIGIN

WIDTH = timedelta(minutes=1)  # every rollup width is a multiple of it (data_rollups.TABLES)

# bad: the quarantine's bounds test (`_quarantine_out_of_bounds`) in fewer steps: PostgreSQL
# sorts NaN above every number, so `abs(value) <= max` is false for NaN as for a value too big,
# and NULLs come out NULL in both (a row data.readings refuses anyway, kept in bounds by both).
# OFFSET 0 keeps the inner query apart, so `bad` is computed once per row, not once per use
_GROUP = f"""CREATE TEMP TABLE window_groups ON COMMIT DROP AS
   SELECT tenant, device_id, metric, bucket, count(*) AS n, sum(v) AS total, min(v) AS min_value,
          max(v) AS max_value, var_pop(v) * count(*) AS m2, min(ts) AS first_ts, max(ts) AS last_ts
   FROM (SELECT tenant, device_id, metric, ts,
                CASE WHEN bad THEN NULL ELSE value END AS v,
                CASE WHEN bad THEN NULL ELSE date_bin($4, ts, {ORIGIN}) END AS bucket
         FROM (SELECT tenant, device_id, metric, ts, value,
                      NOT (ts BETWEEN $1 AND $2 AND abs(value) <= $3) AS bad
               FROM incoming OFFSET 0) i) b
   GROUP BY tenant, device_id, metric, bucket"""

_COUNT = """SELECT coalesce(sum(n) FILTER (WHERE bucket IS NULL), 0) AS out_of_bounds,
          min(first_ts) FILTER (WHERE bucket IS NOT NULL)::date AS first,
          max(last_ts) FILTER (WHERE bucket IS NOT NULL)::date AS last
   FROM window_groups"""

# per series from its groups: the variance from the groups' m2 and their means' distance to the
# series mean (Chan et al.'s parallel formula; no sum of squares, which would cancel). First and
# last values by index from data.readings, once the window's rows are there: per series, two
# lookups cost less than carrying {ts, value} pairs through the pass over every reading.
# `ins` answers the stored count per tenant
_STATS = """WITH ins AS (
       INSERT INTO data.window_stats
       SELECT $1, tenant, device_id, metric, n, mean, var, min_value, max_value,
              first_ts, (SELECT r.value FROM data.readings r WHERE r.tenant = s.tenant
                  AND r.device_id = s.device_id AND r.metric = s.metric AND r.ts = s.first_ts LIMIT 1),
              last_ts, (SELECT r.value FROM data.readings r WHERE r.tenant = s.tenant
                  AND r.device_id = s.device_id AND r.metric = s.metric AND r.ts = s.last_ts LIMIT 1)
       FROM (SELECT tenant, device_id, metric, sum(n) AS n, sum(total) / sum(n) AS mean,
                    sum(m2 + n * d * d) / sum(n) AS var, min(min_value) AS min_value,
                    max(max_value) AS max_value, min(first_ts) AS first_ts, max(last_ts) AS last_ts
             FROM (SELECT *, total / n - sum(total) OVER w / sum(n) OVER w AS d FROM window_groups
                   WINDOW w AS (PARTITION BY tenant, device_id, metric)) g
             GROUP BY tenant, device_id, metric) s
       RETURNING tenant, n)
   SELECT tenant, sum(n) AS stored FROM ins GROUP BY tenant"""


async def group(conn: Any, oldest: datetime, latest: datetime, max_abs: float) -> Any:
    """Aggregate `incoming` into `window_groups`. Answers `out_of_bounds`: the count of its
    readings outside the bounds (ts not in [oldest, latest], NaN, |value| above max_abs), whose
    groups have a NULL bucket, and the `first` and `last` day of the others (None: no reading)."""
    await conn.execute(_GROUP, oldest, latest, max_abs, WIDTH)
    return await conn.fetchrow(_COUNT)


async def drop_out_of_bounds(conn: Any) -> None:
    """Drop the groups of the readings outside the bounds (once they are out of `incoming`)."""
    await conn.execute("DELETE FROM window_groups WHERE bucket IS NULL")


async def add_stats(conn: Any, window_id: str) -> dict[str, int]:
    """Write the window's per-series aggregates to data.window_stats from `window_groups`, once
    its readings are in data.readings; readings stored per tenant."""
    return {r["tenant"]: int(r["stored"]) for r in await conn.fetch(_STATS, window_id)}
