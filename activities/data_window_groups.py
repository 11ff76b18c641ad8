"""A window's readings aggregated once: store_window's one pass over its `incoming` rows.

`group` reads `incoming` once into the small temp table `window_groups`, one row per (tenant,
device, metric, 1-minute bucket): count, sum, min, max, the sum of squared deviations from the
group's mean (m2), the first and last ts and their values. Readings outside the bounds get a
group of their own per series with a NULL bucket (and no aggregates), so finding none costs no
extra pass; when there are some, the caller quarantines them and `drop_out_of_bounds` drops
their groups. The window's per-series stats (`add_stats`) and the rollups
(data_rollups.add_window) are then derived from these groups, not from the readings again.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from activities.data_rollups import ORIGIN

WIDTH = timedelta(minutes=1)  # every rollup width is a multiple of it (data_rollups.TABLES)

# bad: the bounds test of the quarantine (its NOT(...) exactly); a NULL (a NULL ts or value,
# which data.readings refuses anyway) counts as in bounds, as the quarantine's DELETE keeps it.
# first_at / last_at: {epoch seconds, value} of the group's first and last reading, so the
# series' first and last values need no second look at the rows (arrays compare element by
# element: where two readings share the ts, the least value is first and the greatest last;
# a float8 epoch tells microseconds apart until 2106)
_GROUP = f"""CREATE TEMP TABLE window_groups ON COMMIT DROP AS
   SELECT tenant, device_id, metric, bucket, count(*) AS n, sum(v) AS total, min(v) AS min_value,
          max(v) AS max_value, var_pop(v) * count(v) AS m2, min(ts) AS first_ts, max(ts) AS last_ts,
          min(at) AS first_at, max(at) AS last_at
   FROM (SELECT tenant, device_id, metric, ts,
                CASE WHEN bad THEN NULL ELSE value END AS v,
                CASE WHEN bad THEN NULL ELSE date_bin($4, ts, {ORIGIN}) END AS bucket,
                CASE WHEN bad THEN NULL ELSE ARRAY[date_part('epoch', ts), value] END AS at
         FROM (SELECT tenant, device_id, metric, ts, value,
                      NOT (ts BETWEEN $1 AND $2) OR value = 'NaN' OR abs(value) > $3 AS bad
               FROM incoming) i) b
   GROUP BY tenant, device_id, metric, bucket"""

# per series from its groups: the variance from the groups' m2 and their means' distance to the
# series mean (Chan et al.'s parallel formula; no sum of squares, which would cancel); `ins`
# answers the stored count and day span per tenant
_STATS = """WITH ins AS (
       INSERT INTO data.window_stats
       SELECT $1, tenant, device_id, metric, sum(n), sum(total) / sum(n), sum(m2 + n * d * d) / sum(n),
              min(min_value), max(max_value), min(first_ts), (min(first_at))[2], max(last_ts),
              (max(last_at))[2]
       FROM (SELECT *, total / n - sum(total) OVER w / sum(n) OVER w AS d FROM window_groups
             WINDOW w AS (PARTITION BY tenant, device_id, metric)) g
       GROUP BY tenant, device_id, metric
       RETURNING tenant, n, first_ts, last_ts)
   SELECT tenant, sum(n) AS stored, min(first_ts)::date AS first, max(last_ts)::date AS last
   FROM ins GROUP BY tenant"""


async def group(conn: Any, oldest: datetime, latest: datetime, max_abs: float) -> int:
    """Aggregate `incoming` into `window_groups`; the count of its readings outside the bounds
    (ts not in [oldest, latest], NaN, |value| above max_abs), whose groups have a NULL bucket."""
    await conn.execute(_GROUP, oldest, latest, max_abs, WIDTH)
    bad = await conn.fetchval("SELECT coalesce(sum(n), 0) FROM window_groups WHERE bucket IS NULL")
    return int(bad)


async def drop_out_of_bounds(conn: Any) -> None:
    """Drop the groups of the readings outside the bounds (once they are out of `incoming`)."""
    await conn.execute("DELETE FROM window_groups WHERE bucket IS NULL")


async def add_stats(conn: Any, window_id: str) -> list[Any]:
    """Write the window's per-series aggregates to data.window_stats from `window_groups`;
    per tenant: readings stored and the first
    and last day (`stored`, `first`, `last`)."""
    return list(await conn.fetch(_STATS, window_id))
