"""The accept path of telemetry published over MQTT, on the data service's side: many publishes,
of many connections, go into `data.ingest_batches` in one statement (one transaction: a group
commit), in the CSV form of `POST /v1/telemetry`'s batches (activities/telemetry_accept.py).
The MQTT processes (gateway/, the EMQX bridge) gather the groups and acknowledge each publish
once its group committed; nothing here knows MQTT packets.

The publishes of a group without a `batch_id` of their own become one row per tenant and
ingestion shard (writer `mqtt`, a fresh batch id; `device_ids` lists their devices), their CSV
lines one after the other, each line naming its own publish's id: a row per publish cost the
accept path and every step of the ingestion shards (claim, store, mark stored) a row each.
A device's publishes always land on its own shard (as its HTTP batches do), so its windows stay
in order. A grouped row that turns out to be a poison pill is given back to the shards as one
row per device (activities/ingest_windows.py), so only the device whose readings fail is set
aside.

A publish is stored once across redelivery:
- with a `batch_id` of its own, by `(tenant, device:<id>, batch_id)`, the key HTTP uses;
- otherwise under a fresh id, remembered in `data.mqtt_packets` with its packet id and
  payload digest: a publish redelivered with DUP set (its PUBACK was lost) that matches the
  last stored publish of that packet id (in the table, or earlier in the same group) is
  acknowledged and not stored again.
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from itertools import accumulate

from asyncpg import Record
from asyncpg.pool import PoolConnectionProxy

from activities.telemetry_accept import ReadingColumns, digests_before
from fleetflow.contracts.telemetry import BUCKETS, MAX_BATCH_BYTES, MAX_BATCH_READINGS
from fleetflow.db import Pool
from fleetflow.metrics import READINGS_ACCEPTED

# the writer of the rows that gather the publishes without a batch id of one group commit
GROUPED_WRITER = "mqtt"


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
        """The id, CSV payload (and, for a batch id of its own, digest) it is stored under."""
        self.key = self.batch_id or f"mqtt-{uuid.uuid4().hex}"
        prefix = f"{self.tenant},{self.key},"
        self.payload = "".join(prefix + row for row in self.rows).encode()
        if self.batch_id is not None:  # only a batch id of its own is compared on its return
            self.digest = hashlib.sha256(self.payload).digest()

    def same_readings(self, stored: bytes) -> bool:
        """Whether `stored`, the digest its batch id holds, is of these readings: in the form
        written now, or the one releases before wrote (isoformat, repr) for a batch stored then
        and published again since (its PUBACK lost), as the HTTP accept path checks too."""
        if stored == self.digest:
            return True
        rows = [row.rstrip("\n").split(",") for row in self.rows]  # device,metric,ts,value
        columns = ReadingColumns(
            self.key,
            [r[0] for r in rows],
            [datetime.fromisoformat(r[2]) for r in rows],
            [r[1] for r in rows],
            [float(r[3]) for r in rows],
        )
        return stored in digests_before(self.tenant, columns)

    @property
    def writer(self) -> str:
        """The owner of the batch id: the device, as over HTTP with its credential."""
        return f"device:{self.device_id}"

    @property
    def remembered(self) -> bool:
        """Whether it is remembered by packet id (no batch id of its own, QoS 1)."""
        return self.batch_id is None and bool(self.packet_id)


# one round trip: the publishes with a batch id of their own inserted one row each (unless the
# id is there: its digest read back), the others' grouped rows, their packet ids remembered
_ACCEPT = """WITH own AS (
       SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::int[],
                            $6::int[], $7::text[], $8::bytea[], $9::bytea[])
           AS u(i, tenant, writer, batch_id, bucket, readings, device_id, payload, digest)),
   ins AS (
       INSERT INTO data.ingest_batches
           (tenant, writer, batch_id, bucket, readings, device_ids, payload, digest)
       SELECT tenant, writer, batch_id, bucket, readings, ARRAY[device_id], payload, digest
       FROM own
       ON CONFLICT (tenant, writer, batch_id) DO NOTHING
       RETURNING tenant, writer, batch_id),
   grouped AS (
       INSERT INTO data.ingest_batches
           (tenant, writer, batch_id, bucket, readings, device_ids, payload)
       SELECT g.tenant, $10, g.batch_id, g.bucket, g.readings,
              -- row n's devices: a slice of them all, from its first ($16) to the next row's
              -- (a scan of them all per row cost 2,000 x 2,000 steps for a group of many tenants)
              ($17::text[])[
                  ($16::int[])[g.n + 1]:coalesce(($16::int[])[g.n + 2] - 1, cardinality($17::text[]))],
              g.payload
       FROM unnest($11::int[], $12::text[], $13::text[], $14::int[], $15::int[], $18::bytea[])
           AS g(n, tenant, batch_id, bucket, readings, payload)),
   remembered AS (
       INSERT INTO data.mqtt_packets (tenant, device_id, packet_id, digest, batch_id)
       SELECT * FROM unnest($19::text[], $20::text[], $21::int[], $22::bytea[], $23::text[])
       ON CONFLICT (tenant, device_id, packet_id)
       DO UPDATE SET digest = EXCLUDED.digest, batch_id = EXCLUDED.batch_id)
   SELECT o.i, n.batch_id IS NOT NULL AS inserted,
          CASE WHEN n.batch_id IS NULL THEN (
              SELECT b.digest FROM data.ingest_batches b
              WHERE b.tenant = o.tenant AND b.writer = o.writer AND b.batch_id = o.batch_id)
          END AS stored
   FROM own o LEFT JOIN ins n USING (tenant, writer, batch_id)"""

# the packet ids of the redelivered publishes, upserted before anything else: a group still
# committing the original (up to 4 are in flight; a new connection, or another gateway, takes the
# copy meanwhile) is waited for, and the digest it stored is read then. A plain read did not see
# its uncommitted row, and the copy was stored a second time. A packet id not there yet gets an
# empty digest, replaced by this group's `remembered`; rows in key order (no deadlock between two
# groups); one round trip, and index lookups only
_REDELIVERED = """INSERT INTO data.mqtt_packets AS m (tenant, device_id, packet_id, digest, batch_id)
   SELECT u.tenant, u.device_id, u.packet_id, ''::bytea, ''
   FROM unnest($1::text[], $2::text[], $3::int[]) AS u(tenant, device_id, packet_id)
   ORDER BY 1, 2, 3
   ON CONFLICT (tenant, device_id, packet_id) DO UPDATE SET digest = m.digest
   RETURNING m.tenant, m.device_id, m.packet_id, m.digest"""


def _duplicates_in_group(group: list[Publish]) -> set[int]:
    """The redelivered publishes whose original is earlier in the same group."""
    seen: dict[tuple[str, str, int | None], bytes] = {}
    found: set[int] = set()
    for i, p in enumerate(group):
        if not p.remembered:
            continue
        packet = (p.tenant, p.device_id, p.packet_id)
        if p.dup and seen.get(packet) == p.payload_digest:
            found.add(i)
        else:
            seen[packet] = p.payload_digest
    return found


@asynccontextmanager
async def _transaction(
    db: Pool | PoolConnectionProxy[Record], needed: bool
) -> AsyncIterator[Pool | PoolConnectionProxy[Record]]:
    """A connection in a transaction when needed (two statements), else db as it is."""
    if not needed:
        yield db
        return
    if isinstance(db, PoolConnectionProxy):
        async with db.transaction():
            yield db
        return
    async with db.acquire() as conn, conn.transaction():
        yield conn


async def accept_publishes(
    db: Pool | PoolConnectionProxy[Record], group: list[Publish], *, shards: int
) -> list[Outcome]:
    """Store a group of prepared publishes in one transaction (one round trip unless some are
    redelivered): the redelivered duplicates found, the rest inserted (those without a batch
    id of their own in one row per tenant and shard, of `shards`), the packet ids of what was
    new remembered, and the digest of what an existing batch id holds read back (db: a pool
    or a connection the caller holds). One outcome per publish, in order; raises the driver's
    error when nothing was stored."""
    outcomes = [Outcome.STORED] * len(group)
    duplicates = _duplicates_in_group(group)
    redelivered = [i for i, p in enumerate(group) if p.dup and p.remembered and i not in duplicates]
    async with _transaction(db, bool(redelivered)) as conn:
        if redelivered:
            packets = sorted({_packet(group[i]) for i in redelivered})
            found = await conn.fetch(
                _REDELIVERED,
                [t for t, _, _ in packets],
                [d for _, d, _ in packets],
                [pid for _, _, pid in packets],
            )
            last = {(r["tenant"], r["device_id"], r["packet_id"]): bytes(r["digest"]) for r in found}
            duplicates.update(
                i
                for i in redelivered
                if group[i].payload_digest  # never the empty digest of a packet id just inserted
                and last.get(_packet(group[i])) == group[i].payload_digest
            )
        # in key order, as the packet ids: two groups take the same keys in the same order
        own = sorted(
            (i for i, p in enumerate(group) if p.batch_id is not None),
            key=lambda i: (group[i].tenant, group[i].writer, group[i].key),
        )
        rows = await conn.fetch(_ACCEPT, *_own_args(group, own), *_grouped_args(group, duplicates, shards))
    for i in duplicates:
        outcomes[i] = Outcome.DUPLICATE
    first: dict[tuple[str, str, str], bytes] = {}  # key -> digest of the copy stored
    for r in sorted(rows, key=lambda row: int(row["i"])):
        i = int(r["i"])
        p = group[i]
        key = (p.tenant, p.writer, p.key)
        if r["inserted"] and key not in first:
            first[key] = p.digest
        elif r["inserted"]:  # a second copy of a batch id in this group
            outcomes[i] = Outcome.DUPLICATE if first[key] == p.digest else Outcome.CONFLICT
        elif r["stored"] is not None and not p.same_readings(r["stored"]):
            outcomes[i] = Outcome.CONFLICT
        else:
            outcomes[i] = Outcome.DUPLICATE
    stored = sum(len(p.rows) for p, o in zip(group, outcomes, strict=True) if o is Outcome.STORED)
    if stored:
        READINGS_ACCEPTED.add(stored)
    return outcomes


def _packet(p: Publish) -> tuple[str, str, int]:
    return p.tenant, p.device_id, p.packet_id or 0


def _bucket(device_id: str) -> int:
    return zlib.crc32(device_id.encode()) % BUCKETS


def _own_args(group: list[Publish], own: list[int]) -> list[object]:
    """The statement's arguments $1-$9: the publishes with a batch id of their own."""
    return [
        own,
        [group[i].tenant for i in own],
        [group[i].writer for i in own],
        [group[i].key for i in own],
        [_bucket(group[i].device_id) for i in own],
        [len(group[i].rows) for i in own],
        [group[i].device_id for i in own],
        [group[i].payload for i in own],
        [group[i].digest for i in own],
    ]


def _grouped_args(group: list[Publish], duplicates: set[int], shards: int) -> list[object]:
    """The statement's arguments $10-$23: the grouped rows (one per tenant and shard, more when
    they would outgrow an HTTP batch), their devices, and the packet ids to remember (the last
    of each packet id in the group)."""
    rows: dict[tuple[str, int], int] = {}  # (tenant, shard) -> number of its row being filled
    keys: list[tuple[str, int]] = []  # (tenant, shard) of each row
    readings: list[int] = []
    sizes: list[int] = []
    payloads: list[list[bytes]] = []
    devices: list[dict[str, None]] = []
    packets: dict[tuple[str, str, int], Publish] = {}
    for i, p in enumerate(group):
        if p.batch_id is not None or i in duplicates:
            continue
        # a device's publishes stay on its shard (bucket % shards): its windows keep their order
        shard = (p.tenant, _bucket(p.device_id) % shards)
        n = rows.get(shard)
        if n is None or (
            # no row larger than an HTTP batch: the windows are sized for those
            readings[n] + len(p.rows) > MAX_BATCH_READINGS or sizes[n] + len(p.payload) > MAX_BATCH_BYTES
        ):
            n = rows[shard] = len(keys)
            keys.append(shard)
            readings.append(0)
            sizes.append(0)
            payloads.append([])
            devices.append({})
        readings[n] += len(p.rows)
        sizes[n] += len(p.payload)
        payloads[n].append(p.payload)
        devices[n][p.device_id] = None
        if p.remembered:
            assert p.packet_id is not None
            packets[(p.tenant, p.device_id, p.packet_id)] = p
    packets = dict(sorted(packets.items()))  # in key order, as _REDELIVERED: no deadlock
    members = [(n, d) for n in range(len(keys)) for d in devices[n]]
    group_id = uuid.uuid4().hex  # its rows' ids sort in the order of their publishes
    return [
        GROUPED_WRITER,
        list(range(len(keys))),
        [tenant for tenant, _ in keys],
        [f"mqtt-group-{group_id}-{n:04d}" for n in range(len(keys))],
        [shard for _, shard in keys],  # the row's bucket: its shard, for any number of shards
        readings,
        list(accumulate((len(d) for d in devices[:-1]), initial=1)),  # each row's first device
        [d for _, d in members],
        [b"".join(parts) for parts in payloads],
        [t for t, _, _ in packets],
        [d for _, d, _ in packets],
        [pid for _, _, pid in packets],
        [p.payload_digest for p in packets.values()],
        [p.key for p in packets.values()],
    ]


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
