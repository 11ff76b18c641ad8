"""The data service's retention (the `Retention` schedule's data step).

Raw readings live in daily partitions of data.readings shared by every tenant, so a whole day
goes (DROP TABLE of its partition: no row-by-row delete, no dead tuples, disk back at once)
only when every tenant's retention lets it go: when the day is older than the longest
`raw_retention_days` of any tenant (the default 30 days, or a profile's). Tenants whose
retention is shorter than that longest one (everyone, once a single tenant keeps 90 days)
lose their older rows by DELETE, limited to the partitions still kept; with no tenant above the
default this never happens. Rollups are not partitioned (small: a row per series and bucket)
and are deleted by each tenant's `rollup_retention_days`. Stored ingest batches (their ids:
a batch id seen again after this is new), stored windows' bookkeeping and quarantined
readings and poison-pill batches go after BATCH_RETENTION_DAYS / DEAD_LETTER_RETENTION_DAYS.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import asyncpg

from fleetflow.contracts.retention import (
    BATCH_RETENTION_DAYS,
    DEAD_LETTER_RETENTION_DAYS,
    DataRetained,
    RetentionRequest,
)
from fleetflow.contracts.tenants import TenantLimits
from fleetflow.db import Pool
from fleetflow.tenant_profiles import retention_overrides

PARTITION = re.compile(r"^readings_(\d{8})$")
# a drop needs the parent's exclusive lock: wait this long for running stores, else try next run
LOCK_TIMEOUT = "5s"


def _count(result: str) -> int:
    return int(str(result).split()[-1])


def _groups(overrides: dict[str, int], default: int) -> Iterator[tuple[int, list[str], bool]]:
    """(days, tenants, is_default) per distinct retention: the default group means every tenant
    but those listed with another value."""
    others = sorted(t for t, d in overrides.items() if d != default)
    yield default, others, True
    for days in sorted({d for d in overrides.values() if d != default}):
        yield days, sorted(t for t, d in overrides.items() if d == days), False


def _tenant_filter(tenants: list[str], is_default: bool) -> str:
    return "tenant <> ALL($2::text[])" if is_default else "tenant = ANY($2::text[])"


async def apply_retention(pool: Pool, request: RetentionRequest, partition_lock: int) -> DataRetained:
    """Apply every retention at request.now (the database's clock when None)."""
    now: datetime = request.now or await pool.fetchval("SELECT now()")
    defaults = TenantLimits()
    stored = await retention_overrides(pool)
    raw = {t: r for t, (r, _) in stored.items() if r is not None}
    # rollups kept at least as long as the raw rows: an aligned bucketed read answers from the
    # rollups only, so rollups gone before the raw rows would read as no data at all
    kept_rollups = {
        t: max(
            defaults.rollup_retention_days if roll is None else roll,
            defaults.raw_retention_days if r is None else r,
        )
        for t, (r, roll) in stored.items()
    }
    rollup_default = max(defaults.rollup_retention_days, defaults.raw_retention_days)
    longest = max([defaults.raw_retention_days, *raw.values()])
    horizon = now - timedelta(days=longest)
    result = DataRetained()
    result.partitions_dropped, result.oldest_partition_kept = await _drop_partitions(
        pool, horizon, partition_lock
    )
    for days, tenants, is_default in _groups(raw, defaults.raw_retention_days):
        if days >= longest:
            continue
        result.readings_deleted += _count(
            await pool.execute(
                f"""DELETE FROM data.readings WHERE ts < $1 AND ts >= $3
                    AND {_tenant_filter(tenants, is_default)}""",
                now - timedelta(days=days),
                tenants,
                horizon,
            )
        )
    for days, tenants, is_default in _groups(kept_rollups, rollup_default):
        cutoff = now - timedelta(days=days)
        for table in ("data.rollups_1m", "data.rollups_1h"):
            result.rollups_deleted += _count(
                await pool.execute(
                    f"DELETE FROM {table} WHERE bucket < $1 AND {_tenant_filter(tenants, is_default)}",
                    cutoff,
                    tenants,
                )
            )
    batches_cutoff = now - timedelta(days=BATCH_RETENTION_DAYS)
    dead_cutoff = now - timedelta(days=DEAD_LETTER_RETENTION_DAYS)
    async with pool.acquire() as conn, conn.transaction():
        # the readable rows of a poison-pill batch: their window is never stored (no
        # data.windows row), so they go with their batch, before it
        result.quarantined_deleted = _count(
            await conn.execute(
                """DELETE FROM data.quarantined_readings q USING data.ingest_batches b
                   WHERE b.status = 'quarantined' AND b.quarantined_at < $1 AND q.tenant = b.tenant
                     AND q.batch_id = b.batch_id AND q.window_id = b.window_id""",
                dead_cutoff,
            )
        )
        result.batches_deleted = _count(
            await conn.execute(
                """DELETE FROM data.ingest_batches
                   WHERE (status = 'stored' AND stored_at < $1)
                      OR (status = 'quarantined' AND quarantined_at < $2)""",
                batches_cutoff,
                dead_cutoff,
            )
        )
        result.quarantined_deleted += _count(
            await conn.execute(
                """DELETE FROM data.quarantined_readings q USING data.windows w
                   WHERE q.window_id = w.window_id AND w.stored_at < $1""",
                dead_cutoff,
            )
        )
        await conn.execute(
            """DELETE FROM data.window_stats s USING data.windows w
               WHERE s.window_id = w.window_id AND w.stored_at < $1""",
            batches_cutoff,
        )
        result.windows_deleted = _count(
            await conn.execute("DELETE FROM data.windows WHERE stored_at < $1", batches_cutoff)
        )
    return result


async def _drop_partitions(pool: Pool, horizon: datetime, partition_lock: int) -> tuple[int, str | None]:
    """Drop every daily partition whose whole day is before horizon; (dropped, oldest kept)."""
    names = [
        r["name"]
        for r in await pool.fetch(
            """SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               WHERE i.inhparent = 'data.readings'::regclass ORDER BY 1"""
        )
    ]
    days = {n: _day(n) for n in names}
    old = [n for n, d in days.items() if d is not None and _end(d) <= horizon]
    dropped = 0
    for name in old:
        try:
            await _drop(pool, name, partition_lock)
        except asyncpg.exceptions.LockNotAvailableError:
            continue  # a long store holds the table: this day goes next run
        dropped += 1
    kept = sorted(n for n in names if n not in old)
    return dropped, kept[0] if kept else None


async def _drop(pool: Pool, name: str, partition_lock: int) -> None:
    async with pool.acquire() as conn, conn.transaction():
        # the lock partitions are created under: a store making one waits, then finds it gone
        # and makes it again (a late reading), which the next run drops
        await conn.execute("SELECT pg_advisory_xact_lock($1)", partition_lock)
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        await conn.execute(f"DROP TABLE IF EXISTS data.{name}")


def _day(name: str) -> date | None:
    match = PARTITION.match(name)
    return None if match is None else datetime.strptime(match.group(1), "%Y%m%d").date()


def _end(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
