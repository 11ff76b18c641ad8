"""The accept path of telemetry published over MQTT, on the data service's side: many publishes,
of many connections, go into `data.ingest_batches` in one statement (one transaction: a group
commit), in the CSV form of `POST /v1/telemetry`'s batches (activities/telemetry_accept.py).
The MQTT processes (gateway/, the EMQX bridge) gather the groups and acknowledge each publish
once its group committed; nothing here knows MQTT packets.

A publish is stored once across redelivery:
- with a `batch_id` of its own, by `(tenant, device:<id>, batch_id)`, the key HTTP uses;
- otherwise under a fresh batch id, remembered in `data.mqtt_packets` with its packet id and
  payload digest: a publish redelivered with DUP set (its PUBACK was lost) that matches the
  last stored publish of that packet id is acknowledged and not stored again.
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from dataclasses import dataclass
from enum import Enum

from asyncpg import Record
from asyncpg.pool import PoolConnectionProxy

from fleetflow.contracts.telemetry import BUCKETS
from fleetflow.db import Pool
from fleetflow.metrics import READINGS_ACCEPTED


class Outcome(Enum):
    """How a publish ended."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"  # its batch_id holds other readings already
    UNAVAILABLE = "unavailable"  # not stored (database away): not acknowledged, the client redelivers


@dataclass(slots=True)
class Publish:
    """One telemetry publish of a device, as it is stored."""

    tenant: str
    device_id: str
    rows: list[str]  # `device_id,metric,ts,value\n` lines
    batch_id: str | None  # the device's own batch id, or None
    packet_id: int | None = None
    dup: bool = False
    payload_digest: bytes = b""  # of the MQTT payload (redelivery of the same packet id)
    # filled by prepare()
    key: str = ""
    payload: bytes = b""
    digest: bytes = b""

    def prepare(self) -> None:
        """The batch id, CSV payload and digest this publish is stored under."""
        self.key = self.batch_id or f"mqtt-{uuid.uuid4().hex}"
        prefix = f"{self.tenant},{self.key},"
        self.payload = "".join(prefix + row for row in self.rows).encode()
        self.digest = hashlib.sha256(self.payload).digest()

    @property
    def writer(self) -> str:
        """The owner of the batch id: the device, as over HTTP with its credential."""
        return f"device:{self.device_id}"


_ACCEPT = """WITH input AS (
       SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::int[],
                            $6::int[], $7::text[], $8::bytea[], $9::bytea[], $10::int[],
                            $11::bytea[], $12::bool[])
           AS u(i, tenant, writer, batch_id, bucket, readings, device_id, payload, digest,
                packet_id, payload_digest, redelivered)),
   -- scalar subqueries: one index lookup per row that needs it (a join let the
   -- planner scan the whole table for every group)
   dup AS (
       SELECT u.i FROM input u
       WHERE u.redelivered AND u.payload_digest = (
           SELECT m.digest FROM data.mqtt_packets m
           WHERE m.tenant = u.tenant AND m.device_id = u.device_id
             AND m.packet_id = u.packet_id)),
   ins AS (
       INSERT INTO data.ingest_batches
           (tenant, writer, batch_id, bucket, readings, device_ids, payload, digest)
       SELECT tenant, writer, batch_id, bucket, readings, ARRAY[device_id], payload, digest
       FROM input WHERE i NOT IN (SELECT i FROM dup)
       ON CONFLICT (tenant, writer, batch_id) DO NOTHING
       RETURNING tenant, writer, batch_id),
   remembered AS (
       INSERT INTO data.mqtt_packets (tenant, device_id, packet_id, digest, batch_id)
       SELECT DISTINCT ON (u.tenant, u.device_id, u.packet_id)
              u.tenant, u.device_id, u.packet_id, u.payload_digest, u.batch_id
       FROM input u JOIN ins USING (tenant, writer, batch_id)
       WHERE u.packet_id IS NOT NULL
       ORDER BY u.tenant, u.device_id, u.packet_id, u.i DESC
       ON CONFLICT (tenant, device_id, packet_id)
       DO UPDATE SET digest = EXCLUDED.digest, batch_id = EXCLUDED.batch_id)
   SELECT u.i, d.i IS NOT NULL AS dup, n.batch_id IS NOT NULL AS inserted,
          CASE WHEN n.batch_id IS NULL AND d.i IS NULL THEN (
              SELECT b.digest = u.digest FROM data.ingest_batches b
              WHERE b.tenant = u.tenant AND b.writer = u.writer AND b.batch_id = u.batch_id)
          END AS same
   FROM input u
   LEFT JOIN dup d ON d.i = u.i
   LEFT JOIN ins n USING (tenant, writer, batch_id)"""


async def accept_publishes(pool: Pool | PoolConnectionProxy[Record], group: list[Publish]) -> list[Outcome]:
    """Store a group of prepared publishes in one statement (one round trip, its own
    transaction): the redelivered duplicates found, the rest inserted, the packet ids of what was
    new remembered, and the digest of what an existing batch id holds read back (pool: or a
    connection the caller holds). One outcome per
    publish, in order; raises the driver's error when nothing was stored."""
    rows = await pool.fetch(
        _ACCEPT,
        list(range(len(group))),
        [p.tenant for p in group],
        [p.writer for p in group],
        [p.key for p in group],
        [zlib.crc32(p.device_id.encode()) % BUCKETS for p in group],
        [len(p.rows) for p in group],
        [p.device_id for p in group],
        [p.payload for p in group],
        [p.digest for p in group],
        # only publishes without a batch id of their own are remembered by packet id
        [p.packet_id if p.batch_id is None and p.packet_id else None for p in group],
        [p.payload_digest for p in group],
        [bool(p.dup and p.batch_id is None and p.packet_id) for p in group],
    )
    outcomes = [Outcome.DUPLICATE] * len(group)
    first: dict[tuple[str, str, str], bytes] = {}  # key -> digest of the copy stored
    for r in sorted(rows, key=lambda row: int(row["i"])):
        p = group[r["i"]]
        key = (p.tenant, p.writer, p.key)
        if r["dup"]:
            continue
        if r["inserted"] and key not in first:
            first[key] = p.digest
            outcomes[r["i"]] = Outcome.STORED
        elif r["inserted"]:  # a second copy of a batch id in this group
            outcomes[r["i"]] = Outcome.DUPLICATE if first[key] == p.digest else Outcome.CONFLICT
        elif r["same"] is False:
            outcomes[r["i"]] = Outcome.CONFLICT
    stored = sum(len(p.rows) for p, o in zip(group, outcomes, strict=True) if o is Outcome.STORED)
    if stored:
        READINGS_ACCEPTED.add(stored)
    return outcomes


async def quarantine_payload(pool: Pool, tenant: str, device_id: str, reason: str) -> None:
    """Count a published payload that was not stored, with its reason, in the quarantine view."""
    await pool.execute(
        """INSERT INTO data.quarantined_readings
               (tenant, device_id, metric, ts, value, reason, batch_id, window_id)
           VALUES ($1, $2, '-', now(), 0, $3, 'mqtt', '')""",
        tenant,
        device_id,
        reason[:500],
    )
