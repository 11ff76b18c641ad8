"""The data service: telemetry storage; owns the `data` schema.

Acknowledged batches wait in `data.ingest_batches` (written by this service's accept path,
activities/telemetry_accept.py, which the API calls before it answers 202). A
TelemetryIngestion workflow claims them in windows; storing a window moves its rows with
COPY into the time-partitioned `data.readings`, puts readings of devices that may not send
into quarantine, and writes per-series aggregates for the analytics service, all in one
transaction: a retry finds the window stored and does nothing twice. Readings outside the
documented bounds (a batch acknowledged before they existed) are quarantined with the bound
as the reason.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any

from temporalio import activity
from temporalio.client import Client

from activities import data_facade, data_retention, data_rollups, data_window_groups, device_facade
from activities.ingest_supervision import IngestionSupervision
from activities.ingest_windows import WatchedReadings, WindowIsolation
from activities.poison import poison_guard
from activities.probe import probe
from activities.scheduled_runs import verify_scheduled_run
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.retention import DataRetained, RetentionRequest, ScheduledRun, ScheduledRunVerdict
from fleetflow.contracts.rollouts import DeviceStep
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import (
    FUTURE_TOLERANCE_S,
    MAX_ABS_VALUE,
    MAX_AGE_DAYS,
    BatchesQuarantined,
    ClaimWindow,
    QuarantineBatches,
    Stored,
    StoreWindow,
    Supervised,
    SuperviseIngestion,
    Window,
    WindowRef,
    WindowSplit,
)
from fleetflow.db import Pool
from fleetflow.interfaces import implements
from fleetflow.interfaces.data import DataActivities

POLL_S = 0.025
HEARTBEAT_S = 1.0  # the SDK sends at most one per 0.8 x the step's heartbeat timeout
_PARTITION_LOCK = 7_001_338
# with hashtext(window_id): held by a window's store to its commit, tried by a claim that adds to
# the window, so no batch joins a window whose store has begun (a late attempt of claim_window)
_WINDOW_LOCK = 7_001_339

# the window's batches so far (a retry's, or a filling window's)
_MINE = """mine AS (
       SELECT count(*) AS batches, coalesce(sum(readings), 0) AS readings,
              coalesce(sum(octet_length(payload)), 0) AS bytes
       FROM data.ingest_batches WHERE window_id = $1)"""


def _oldest_pending(condition: str) -> str:
    """The shard's oldest pending batches (while `condition` holds), with running totals."""
    return f"""oldest AS (
       SELECT tenant, writer, batch_id, readings, received_at,
              coalesce(octet_length(payload), 0) AS bytes FROM data.ingest_batches
       WHERE status = 'pending' AND bucket % $3 = $2 AND {condition}
       ORDER BY received_at, tenant, writer, batch_id LIMIT 2000),
   candidates AS (
       SELECT tenant, writer, batch_id,
              sum(readings) OVER w AS running, sum(bytes) OVER w AS running_bytes
       FROM oldest WINDOW w AS (ORDER BY received_at, tenant, writer, batch_id))"""


def _claim_picked(picked: str, closed: str) -> str:
    """Claim the candidates `picked` selects into the window; its totals, and `closed`."""
    return f"""picked AS (
       SELECT b.tenant, b.writer, b.batch_id FROM data.ingest_batches b
       JOIN candidates c USING (tenant, writer, batch_id)
       WHERE {picked}
       FOR UPDATE OF b SKIP LOCKED),
   claimed AS (
       UPDATE data.ingest_batches b SET status = 'claimed', window_id = $1
       FROM picked p WHERE b.tenant = p.tenant AND b.writer = p.writer
         AND b.batch_id = p.batch_id
         AND b.status = 'pending'
       RETURNING b.readings, coalesce(octet_length(b.payload), 0) AS bytes)
   SELECT (SELECT batches FROM mine) + (SELECT count(*) FROM claimed) AS batches,
          (SELECT readings FROM mine) + (SELECT coalesce(sum(readings), 0) FROM claimed)
              AS readings,
          (SELECT bytes FROM mine) + (SELECT coalesce(sum(bytes), 0) FROM claimed)
              AS bytes,
          {closed} AS closed"""


# the window's first claim: the oldest pending batches of the shard, unless the window has some
# already (a retry); `closed` is always false (no store can have begun: the window is unknown)
_CLAIM = ",\n   ".join(
    (
        f"WITH {_MINE}",
        _oldest_pending("NOT EXISTS (SELECT 1 FROM mine WHERE batches > 0)"),
        _claim_picked(
            "(c.running <= $4 AND c.running_bytes <= $5)"
            " OR c.running = (SELECT min(running) FROM candidates)",
            "false",
        ),
    )
)

# adding to a window that has batches: the shard's oldest pending ones that fit beside them.
# Only while every batch of the window is still claimed and unlocked (no store has begun or
# finished: a store locks them, and FOR SHARE rereads a row a store changed meanwhile) and the
# window's lock is free; otherwise `closed`, and the window is returned as it is
_FILL = ",\n   ".join(
    (
        f"WITH {_MINE}",
        """held AS (
       SELECT batch_id FROM data.ingest_batches WHERE window_id = $1 AND status = 'claimed'
       FOR SHARE SKIP LOCKED)""",
        """open AS (
       SELECT (SELECT count(*) FROM held) = (SELECT batches FROM mine)
              AND pg_try_advisory_xact_lock($6, hashtext($1)) AS ok)""",
        _oldest_pending("(SELECT ok FROM open)"),
        _claim_picked(
            "c.running + (SELECT readings FROM mine) <= $4"
            " AND c.running_bytes + (SELECT bytes FROM mine) <= $5",
            "NOT (SELECT ok FROM open)",
        ),
    )
)


class DataService(DataActivities):
    """Activities of the `data` task queue, and the telemetry read model; temporal (the
    process's client) lets the supervisor (re)start the shard workflows. Window isolation
    and ingestion supervision are parts it delegates to."""

    queue = TaskQueue.DATA

    def __init__(self, pool: Pool, temporal: Client | None = None) -> None:
        self.pool = pool
        self.temporal = temporal
        self.isolation = WindowIsolation(pool)
        self.watched = WatchedReadings(pool)
        self.supervision = IngestionSupervision(pool, temporal)

    @implements(DataActivities.supervise_ingestion)
    async def supervise_ingestion(self, request: SuperviseIngestion) -> Supervised:
        """(Re)start the shards that are not running; reclaim the batches of dead runs."""
        return await self.supervision.supervise_ingestion(request)

    @implements(DataActivities.split_window)
    async def split_window(self, ref: WindowRef) -> WindowSplit:
        """Move the window's claimed batches, oldest first, into two halves."""
        return await self.isolation.split_window(ref)

    @implements(DataActivities.quarantine_batches)
    async def quarantine_batches(self, request: QuarantineBatches) -> BatchesQuarantined:
        """Set the window's claimed batches aside with the reason."""
        return await self.isolation.quarantine_batches(request)

    @implements(DataActivities.ping)
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)

    @implements(DataActivities.retire_telemetry)
    async def retire_telemetry(self, step: DeviceStep) -> int:
        """Archive (or, by policy, delete) a retired device's readings; idempotent."""
        async with self.pool.acquire() as conn, conn.transaction():
            if step.telemetry == "archive":
                await conn.execute(
                    """INSERT INTO data.archived_readings
                       SELECT * FROM data.readings WHERE tenant = $1 AND device_id = $2""",
                    step.tenant,
                    step.device_id,
                )
            result = await conn.execute(
                "DELETE FROM data.readings WHERE tenant = $1 AND device_id = $2", step.tenant, step.device_id
            )
            for table, _ in data_rollups.TABLES:
                await conn.execute(
                    f"DELETE FROM {table} WHERE tenant = $1 AND device_id = $2", step.tenant, step.device_id
                )
        return int(str(result).split()[-1])

    @implements(DataActivities.apply_retention)
    async def apply_retention(self, request: RetentionRequest) -> DataRetained:
        """Drop partitions past every tenant's retention; age out the rest (data_retention)."""
        return await data_retention.apply_retention(self.pool, request, _PARTITION_LOCK)

    @implements(DataActivities.verify_scheduled_run)
    async def verify_scheduled_run(self, run: ScheduledRun) -> ScheduledRunVerdict:
        """Whether the named schedule recorded starting that run (fleetflow.schedules)."""
        return await verify_scheduled_run(self.temporal, run)

    @implements(DataActivities.claim_window)
    async def claim_window(self, request: ClaimWindow) -> Window:
        """Claim pending batches of this shard (oldest first, up to max_readings and max_bytes;
        at least one batch whatever its size).

        Waits up to max_wait_ms for a first batch; then, while the window holds fewer than its
        fill target of readings, keeps claiming the shard's batches into it for up to fill_ms
        (under load the first claim reaches the target: no wait). With watched_fill_ms set, a
        window that holds a reading a rate or zscore rule watches waits at most that long
        instead (an alert waits on it; a threshold rule's is raised on accept). Empty after
        max_wait_ms; a retry returns what this window already claimed (and may add to it the
        same way). `unready` counts the window's devices that may not send, by the device
        facade (0: the workflow skips find_unready).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.max_wait_ms / 1000
        filled_by: float | None = None  # the first claim's time + fill_ms
        first_at = 0.0
        checked = 0  # batches of the window looked at for a watched reading
        while True:
            if filled_by is None:
                row = await self.pool.fetchrow(
                    _CLAIM,
                    request.window_id,
                    request.shard,
                    request.shards,
                    request.max_readings,
                    request.max_bytes,
                )
            else:
                row = await self.pool.fetchrow(
                    _FILL,
                    request.window_id,
                    request.shard,
                    request.shards,
                    request.max_readings,
                    request.max_bytes,
                    _WINDOW_LOCK,
                )
            assert row is not None
            batches, readings, size = row["batches"], row["readings"], row["bytes"]
            window = Window(window_id=request.window_id, batches=batches, readings=readings, bytes=size)
            now = loop.time()
            if window.batches:
                if filled_by is None:
                    filled_by, first_at = now + request.fill_ms / 1000, now
                if (
                    request.watched_fill_ms is not None
                    and window.batches > checked
                    and window.readings < request.fill_target()
                ):
                    checked = window.batches
                    if await self.watched.in_window(request.window_id):
                        filled_by = min(filled_by, first_at + request.watched_fill_ms / 1000)
                        now = loop.time()
                if (
                    window.readings >= request.fill_target()
                    or window.bytes >= request.max_bytes
                    or now >= filled_by
                    or row["closed"]
                ):
                    senders = await data_facade.window_devices(self.pool, request.window_id)
                    unready = await device_facade.count_unready(self.pool, senders)
                    return window.model_copy(update={"unready": unready})
            elif now >= deadline:
                return window
            if activity.in_activity():
                activity.heartbeat()
            await asyncio.sleep(POLL_S)

    @implements(DataActivities.store_window)
    async def store_window(self, request: StoreWindow) -> Stored:
        """COPY the window's readings into data.readings, quarantine the unready devices' ones.

        Heartbeats while it runs: the attempt of a killed worker is retried within the
        heartbeat timeout, not after the whole start-to-close timeout. The window's batches
        are locked first, so a supervisor reclaiming them waits for this transaction (and then
        finds them stored) instead of handing them to another window half-way.
        """
        async with poison_guard(), _heartbeating(), self.pool.acquire() as conn:
            while True:
                try:
                    async with conn.transaction():
                        return await _store(conn, request)
                except _PartitionsMissing as missing:
                    # made in a short transaction of their own, then the store starts again: the
                    # lock that serialises their creation is not held to the end of the store,
                    # which made every shard's store (every tenant's) wait for the slowest one
                    await _create_partitions(conn, missing.days)


async def _store(conn: Any, request: StoreWindow) -> Stored:
    """store_window's transaction."""
    # to the commit: a late claim_window attempt adds no batch to the window from here on
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _WINDOW_LOCK, request.window_id)
    done = await conn.fetchrow("SELECT * FROM data.windows WHERE window_id = $1", request.window_id)
    if done is not None:
        return _stored(request, done["stored"], done["quarantined"], done["by_tenant"])
    await conn.execute(
        """CREATE TEMP TABLE incoming (tenant text, batch_id text, device_id text, metric text,
               ts timestamptz, value double precision) ON COMMIT DROP"""
    )
    payloads = await conn.fetch(
        """SELECT payload FROM data.ingest_batches WHERE window_id = $1 AND status = 'claimed'
           ORDER BY tenant, batch_id FOR UPDATE""",
        request.window_id,
    )
    source = io.BytesIO(b"".join(r["payload"] for r in payloads))
    await conn.copy_to_table("incoming", source=source, format="csv")
    now = datetime.now(UTC)
    # a day of grace on the oldest: a batch may wait a little before it is stored
    bounds = (now - timedelta(days=MAX_AGE_DAYS + 1), now + timedelta(seconds=FUTURE_TOLERANCE_S))
    quarantined = await _quarantine_unready(conn, request)
    # one pass over the rows for every aggregate; it counts the rows outside the bounds too,
    # and most windows have none: only then a second pass moves them out
    grouped = await data_window_groups.group(conn, *bounds, MAX_ABS_VALUE)
    if grouped["out_of_bounds"]:
        for tenant, count in (await _quarantine_out_of_bounds(conn, request, *bounds)).items():
            quarantined[tenant] = quarantined.get(tenant, 0) + count
        await data_window_groups.drop_out_of_bounds(conn)
    if grouped["first"] is not None:
        await _check_partitions(conn, grouped["first"], grouped["last"])
    await conn.execute(
        """INSERT INTO data.readings (tenant, device_id, metric, ts, value)
           SELECT tenant, device_id, metric, ts, value FROM incoming"""
    )
    # in this transaction, which marks the window stored: a retry adds nothing twice
    per_tenant = await data_window_groups.add_stats(conn, request.window_id)
    await data_rollups.add_window(conn)
    by_tenant: dict[str, dict[str, int]] = {t: {"stored": n, "quarantined": 0} for t, n in per_tenant.items()}
    for tenant, count in quarantined.items():
        by_tenant.setdefault(tenant, {"stored": 0, "quarantined": 0})["quarantined"] = count
    stored = sum(t["stored"] for t in by_tenant.values())
    await conn.execute(
        """UPDATE data.ingest_batches SET status = 'stored', stored_at = now(), payload = NULL
           WHERE window_id = $1""",
        request.window_id,
    )
    await conn.execute(
        """INSERT INTO data.windows (window_id, stored, quarantined, by_tenant)
           VALUES ($1, $2, $3, $4)""",
        request.window_id,
        stored,
        sum(quarantined.values()),
        by_tenant,
    )
    return _stored(request, stored, sum(quarantined.values()), by_tenant)


def _stored(request: StoreWindow, stored: int, quarantined: int, by_tenant: dict[str, Any]) -> Stored:
    """The result; counts only unless the caller predates the window tables."""
    return Stored(
        window_id=request.window_id,
        stored=stored,
        quarantined=quarantined,
        by_tenant={} if request.counts_only else by_tenant,
        tenants=len(by_tenant),
    )


@asynccontextmanager
async def _heartbeating() -> AsyncIterator[None]:
    """Heartbeat the current activity every HEARTBEAT_S until the block ends."""
    if not activity.in_activity():
        yield
        return

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(HEARTBEAT_S)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()


async def _quarantine_unready(conn: Any, request: StoreWindow) -> dict[str, int]:
    """Move out of `incoming` into quarantine the rows of devices that may not send (listed
    in device.window_unready by `device.find_unready`); counts per tenant."""
    # the request's own list and what device.find_unready noted (the device service's facade)
    unready = [(u.tenant, u.device_id, u.reason) for u in request.quarantine]
    unready += await device_facade.window_unready(conn, request.window_id)
    if not unready:  # most windows have none: the join would still scan every row of `incoming`
        return {}
    await conn.execute(
        """CREATE TEMP TABLE unready ON COMMIT DROP AS
           SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::text[])
               AS u(tenant, device_id, reason)""",
        [u[0] for u in unready],
        [u[1] for u in unready],
        [u[2] for u in unready],
    )
    return _counts(
        await conn.fetch(
            f"""WITH moved AS (
                   DELETE FROM incoming i USING unready u
                   WHERE u.tenant = i.tenant AND u.device_id = i.device_id
                   RETURNING i.*, u.reason){_KEEP}""",
            request.window_id,
        )
    )


async def _quarantine_out_of_bounds(
    conn: Any, request: StoreWindow, oldest: datetime, latest: datetime
) -> dict[str, int]:
    """Move out of `incoming` into quarantine the rows outside the bounds, with the bound as
    the reason (data_window_groups' `bad` is the same test); counts per tenant."""
    return _counts(
        await conn.fetch(
            f"""WITH moved AS (
                   DELETE FROM incoming i
                   WHERE NOT (i.ts BETWEEN $2 AND $3) OR i.value = 'NaN' OR abs(i.value) > $4
                   RETURNING i.*, CASE WHEN i.ts BETWEEN $2 AND $3 THEN $6 ELSE $5 END AS reason){_KEEP}""",
            request.window_id,
            oldest,
            latest,
            MAX_ABS_VALUE,
            f"ts out of bounds (at most {MAX_AGE_DAYS} days old, {FUTURE_TOLERANCE_S} s ahead)",
            f"value out of bounds (|value| at most {MAX_ABS_VALUE:g})",
        )
    )


def _counts(rows: list[Any]) -> dict[str, int]:
    """{tenant: n} of a quarantine pass's rows."""
    return {r["tenant"]: int(r["n"]) for r in rows}


_KEEP = """,
   kept AS (
       INSERT INTO data.quarantined_readings
       SELECT tenant, device_id, metric, ts, value, reason, batch_id, $1 FROM moved
       RETURNING tenant)
   SELECT tenant, count(*) AS n FROM kept GROUP BY tenant"""


class _PartitionsMissing(Exception):
    """The window's readings need daily partitions that do not exist yet."""

    def __init__(self, days: list[date]) -> None:
        super().__init__(f"{len(days)} daily partitions missing")
        self.days = days


async def _check_partitions(conn: Any, first: date, last: date) -> None:
    """Raise _PartitionsMissing unless data.readings has a partition for every day in [first, last]."""
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    missing = await conn.fetchval(
        """SELECT coalesce(array_agg(d ORDER BY d), '{}') FROM unnest($1::date[]) d
           WHERE to_regclass('data.readings_' || to_char(d, 'YYYYMMDD')) IS NULL""",
        days,
    )
    if missing:
        raise _PartitionsMissing(list(missing))


async def _create_partitions(conn: Any, days: list[date]) -> None:
    """Daily partitions of data.readings for days, in one short transaction."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
        for day in days:
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS data.readings_{day:%Y%m%d} PARTITION OF data.readings
                    FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"""
            )
