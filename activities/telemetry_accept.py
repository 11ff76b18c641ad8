"""The accept path of telemetry, on the data service's side: a validated batch written to
`data.ingest_batches` (durable before the API answers 202) in the CSV form the data service's
windows read back (activities/telemetry.py), at most once per sender and batch id.

The API process calls it with its own pool after authenticating and checking the batch;
nothing here knows HTTP.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC

import asyncpg

from fleetflow.contracts.telemetry import BUCKETS, TelemetryBatchDict
from fleetflow.db import Pool
from fleetflow.metrics import READINGS_ACCEPTED


@dataclass(frozen=True)
class Accepted:
    """What the sender is told: how many readings, and whether the batch was there already."""

    readings: int
    duplicate: bool


class ConflictingBatch(Exception):
    """The sender's batch id was accepted before with other readings."""


class StorageUnavailable(Exception):
    """Nothing was accepted: the database did not take the batch."""


def bucket_of(tenant: str, batch_id: str, devices: Collection[str]) -> int:
    """The batch's bucket (a shard is bucket % shards). A device's own batches always land in
    the same one, so its windows stay in order; a batch of many devices is spread by its id,
    so one big sender does not load one shard."""
    key = next(iter(devices)) if len(devices) == 1 else f"{tenant}/{batch_id}"
    return zlib.crc32(key.encode()) % BUCKETS


def _lines(tenant: str, batch: TelemetryBatchDict) -> list[str]:
    prefix = f"{tenant},{batch['batch_id']},"
    # in UTC: ISO 8601 offsets up to ±23:59 (and sub-minute ones) are valid, but PostgreSQL
    # reads only ±15:59, and a batch it cannot read is a poison pill for its whole window
    return [
        f"{prefix}{r['device_id']},{r['metric']},{r['ts'].astimezone(UTC).isoformat()},{r['value']!r}\n"
        for r in batch["readings"]
    ]


def _digest_as_sent(tenant: str, batch: TelemetryBatchDict) -> bytes:
    """The digest of the batch as the API wrote it before timestamps were put in UTC (each with
    the offset it was sent with): a batch accepted then and repeated now is a duplicate."""
    prefix = f"{tenant},{batch['batch_id']},"
    payload = "".join(
        f"{prefix}{r['device_id']},{r['metric']},{r['ts'].isoformat()},{r['value']!r}\n"
        for r in batch["readings"]
    )
    return hashlib.sha256(payload.encode()).digest()


async def accept_batch(
    pool: Pool, tenant: str, writer: str, batch: TelemetryBatchDict, devices: Collection[str]
) -> Accepted:
    """Store a validated batch of `writer` (`device:<id>` or `token:<subject>`), whose readings
    name `devices`; the same id with the same readings again is a duplicate, stored once.

    Raises ConflictingBatch for the same id with other readings, StorageUnavailable when
    nothing was stored.
    """
    lines = _lines(tenant, batch)
    payload = "".join(lines).encode()
    digest = hashlib.sha256(payload).digest()
    stored: bytes | None = None  # the digest of the batch already there under this key
    inserted = None
    committed = False
    try:
        async with pool.acquire() as conn:
            inserted = await conn.fetchval(
                """INSERT INTO data.ingest_batches
                       (tenant, writer, batch_id, bucket, readings, device_ids, payload, digest)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                   ON CONFLICT (tenant, writer, batch_id) DO NOTHING RETURNING 1""",
                tenant,
                writer,
                batch["batch_id"],
                bucket_of(tenant, batch["batch_id"], devices),
                len(lines),
                sorted(devices),
                payload,
                digest,
            )
            if inserted is None:
                stored = await conn.fetchval(
                    """SELECT digest FROM data.ingest_batches
                       WHERE tenant = $1 AND writer = $2 AND batch_id = $3""",
                    tenant,
                    writer,
                    batch["batch_id"],
                )
            committed = True
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        # a connection the server dropped after the INSERT returned fails only on its way back
        # to the pool (which discards it): the batch is committed, so it is acknowledged
        if not committed:
            raise StorageUnavailable(type(exc).__name__) from None
    if inserted is None and stored is not None and stored not in (digest, _digest_as_sent(tenant, batch)):
        # an id reused for other readings: dropping them silently would lose data
        raise ConflictingBatch(batch["batch_id"])
    if inserted is not None:
        READINGS_ACCEPTED.add(len(lines))
    return Accepted(readings=len(lines), duplicate=inserted is None)
