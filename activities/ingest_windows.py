"""Windows of the data service: whether a filling window holds a reading an alert waits on,
and isolating poison pills.

Isolating poison pills: a window whose step keeps failing is split in two, again and
again, until the batch that fails is alone; that batch is set aside (status
`quarantined`, the error as its reason, payload kept) and its shard goes on.

Part of the data service (it owns `data.ingest_batches`): `DataService` holds one and serves
`split_window` / `quarantine_batches` through it.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import asyncpg

from activities import analytics_facade
from activities.poison import is_transient
from activities.telemetry_publishes import GROUPED_WRITER
from fleetflow.contracts.telemetry import (
    BatchesQuarantined,
    QuarantineBatches,
    Window,
    WindowRef,
    WindowSplit,
)
from fleetflow.db import Pool
from fleetflow.metrics import BATCHES_QUARANTINED

log = logging.getLogger(__name__)

# the (tenant, metric) pairs a filling window's batches hold: the payload is CSV (tenant,
# batch_id, device_id, metric, ts, value) and no field can hold a comma (see
# telemetry_accept.csv_payload), so a line's fourth field is its metric; read as escaped text,
# no byte makes the claim fail. One pass over the payloads, then the analytics facade looks
# the pairs up in its rules by index: a search of each payload for each watched metric took
# ~0.3 s a check for a tenant at its rule quota (1,000) with a 1,000-reading batch, on every
# shard its batches reach, as often as the window grows. A device or batch id that spells a
# metric is no reading of it
_HELD = """SELECT DISTINCT b.tenant, split_part(line, ',', 4) AS metric
   FROM data.ingest_batches b
   CROSS JOIN LATERAL string_to_table(encode(b.payload, 'escape'), E'\\n') AS line
   WHERE b.window_id = $1 AND b.status = 'claimed' AND line <> ''"""


class WatchedReadings:
    """Whether a window holds a reading some enabled rule of its tenant looks at (an alert
    may wait on the window). The rules are looked up through the analytics facade each time:
    no cache to go stale, nothing that grows with the tenants or their rules."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def in_window(self, window_id: str) -> bool:
        """True when one of the window's claimed batches holds a watched (tenant, metric)."""
        held = [(r["tenant"], r["metric"]) for r in await self.pool.fetch(_HELD, window_id)]
        return await analytics_facade.watches_any(self.pool, held)


def half_ids(window_id: str) -> tuple[str, str]:
    """The ids of a window's two halves: they name the window they came from."""
    return f"{window_id}/a", f"{window_id}/b"


class WindowIsolation:
    """Splits a failing window and quarantines its bad batch."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def split_window(self, ref: WindowRef) -> WindowSplit:
        """Move the window's claimed batches, oldest first, into two halves; a retry after the
        commit finds the halves made and answers them again."""
        first, second = half_ids(ref.window_id)
        async with self.pool.acquire() as conn, conn.transaction():
            # ctid: the rows stay locked until commit, and no assumption on the table's key
            rows = await conn.fetch(
                """SELECT ctid FROM data.ingest_batches WHERE window_id = $1 AND status = 'claimed'
                   ORDER BY received_at, tenant, batch_id FOR UPDATE""",
                ref.window_id,
            )
            cut = (len(rows) + 1) // 2
            for window_id, part in ((first, rows[:cut]), (second, rows[cut:])):
                await conn.execute(
                    "UPDATE data.ingest_batches SET window_id = $1 WHERE ctid = ANY($2::tid[])",
                    window_id,
                    [r["ctid"] for r in part],
                )
            counts = {
                r["window_id"]: r
                for r in await conn.fetch(
                    """SELECT window_id, count(*) AS batches, sum(readings) AS readings,
                              coalesce(sum(octet_length(payload)), 0) AS bytes
                       FROM data.ingest_batches WHERE window_id = ANY($1) AND status = 'claimed'
                       GROUP BY window_id""",
                    [first, second],
                )
            }
        return WindowSplit(
            parts=[
                Window(window_id=w, batches=c["batches"], readings=c["readings"], bytes=c["bytes"])
                for w in (first, second)
                if (c := counts.get(w)) is not None
            ]
        )

    async def quarantine_batches(self, request: QuarantineBatches) -> BatchesQuarantined:
        """Set the window's claimed batches aside with the reason; their readings that can be
        read show in the quarantine view under that reason. Idempotent.

        A row of many devices' MQTT publishes (telemetry_publishes) is not set aside whole: it
        goes back to the shard as one pending row per device, and the next windows isolate the
        device whose readings fail."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _give_back_by_device(conn, request)
            batches = await conn.fetch(
                """UPDATE data.ingest_batches SET status = 'quarantined', reason = $2, quarantined_at = now()
                   WHERE window_id = $1 AND status = 'claimed' RETURNING tenant, batch_id, payload""",
                request.window_id,
                request.reason,
            )
            for batch in batches:
                await _keep_readable_rows(conn, request, batch)
            total = await conn.fetchrow(
                """SELECT count(*) AS batches, coalesce(sum(readings), 0) AS readings
                   FROM data.ingest_batches WHERE window_id = $1 AND status = 'quarantined'""",
                request.window_id,
            )
        assert total is not None
        BATCHES_QUARANTINED.add(len(batches))
        return BatchesQuarantined(
            window_id=request.window_id, batches=total["batches"], readings=total["readings"]
        )


async def _give_back_by_device(conn: Any, request: QuarantineBatches) -> None:
    """Split the window's claimed rows of grouped MQTT publishes into pending rows of one device
    each (the row's bucket, so its shard, and its age kept: they come first again); the grouped
    row is marked stored, its payload dropped, the reason kept."""
    grouped = await conn.fetch(
        """SELECT tenant, batch_id, bucket, received_at, payload FROM data.ingest_batches
           WHERE window_id = $1 AND status = 'claimed' AND writer = $2 AND cardinality(device_ids) > 1
           FOR UPDATE""",
        request.window_id,
        GROUPED_WRITER,
    )
    if not grouped:
        return
    await conn.execute(
        """UPDATE data.ingest_batches SET status = 'stored', stored_at = now(), payload = NULL,
                  reason = 'given back by device: ' || $3
           WHERE window_id = $1 AND status = 'claimed' AND writer = $2 AND cardinality(device_ids) > 1""",
        request.window_id,
        GROUPED_WRITER,
        request.reason,
    )
    for row in grouped:
        lines: dict[bytes, list[bytes]] = {}
        for line in (row["payload"] or b"").splitlines(keepends=True):
            fields = line.split(b",", 3)  # tenant,publish id,device id,...: ids hold no comma
            lines.setdefault(fields[2] if len(fields) > 3 else b"-", []).append(line)
        devices = [d.decode(errors="replace") for d in lines]
        await conn.execute(
            """INSERT INTO data.ingest_batches
                   (tenant, writer, batch_id, bucket, readings, device_ids, payload, received_at)
               SELECT $1, $2, $3 || '/' || u.device_id, $4, u.readings, ARRAY[u.device_id], u.payload, $5
               FROM unnest($6::text[], $7::int[], $8::bytea[]) AS u(device_id, readings, payload)
               ON CONFLICT (tenant, writer, batch_id) DO NOTHING""",
            row["tenant"],
            GROUPED_WRITER,
            row["batch_id"],
            row["bucket"],
            row["received_at"],
            devices,
            [len(v) for v in lines.values()],
            [b"".join(v) for v in lines.values()],
        )
        log.warning(
            "grouped batch %s of %d devices given back by device: %s",
            row["batch_id"],
            len(devices),
            request.reason,
        )


async def _keep_readable_rows(conn: Any, request: QuarantineBatches, batch: Any) -> None:
    """Copy what COPY can read of a quarantined batch into data.quarantined_readings; a payload
    it cannot read stays on the batch row only (a savepoint keeps the rest of the work)."""
    if batch["payload"] is None:
        return
    try:
        async with conn.transaction():
            await conn.execute(
                """CREATE TEMP TABLE IF NOT EXISTS poisoned (tenant text, batch_id text, device_id text,
                       metric text, ts timestamptz, value double precision) ON COMMIT DROP"""
            )
            await conn.execute("TRUNCATE poisoned")
            await conn.copy_to_table("poisoned", source=io.BytesIO(batch["payload"]), format="csv")
            await conn.execute(
                """INSERT INTO data.quarantined_readings
                   SELECT tenant, device_id, metric, ts, value, $2, batch_id, $1 FROM poisoned
                   WHERE tenant = $3""",
                request.window_id,
                request.reason,
                batch["tenant"],
            )
    except asyncpg.PostgresError as exc:  # an unreadable payload is what a poison pill can be
        if is_transient(exc):
            raise
        log.warning("quarantined batch %s is unreadable: %s", batch["batch_id"], exc)
