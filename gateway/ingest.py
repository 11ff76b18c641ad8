"""Telemetry publishes made durable in groups: many publishes, of many connections, go into
`data.ingest_batches` in one transaction (group commit), and each one's PUBACK is sent only
once that transaction has committed. The ingestion shards take them from there, as they take
the batches of `POST /v1/telemetry`.

A publish is stored once across redelivery:
- with a `batch_id` of its own, by `(tenant, device:<id>, batch_id)`, the key HTTP uses;
- otherwise under a fresh batch id, remembered in `data.mqtt_packets` with its packet id and
  payload digest: a publish redelivered with DUP set (its PUBACK was lost) that matches the
  last stored publish of that packet id is acknowledged and not stored again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
import zlib
from dataclasses import dataclass
from enum import Enum

import asyncpg

from fleetflow.contracts.telemetry import BUCKETS
from fleetflow.db import Pool
from fleetflow.metrics import READINGS_ACCEPTED

log = logging.getLogger(__name__)
MAX_GROUP = 2000  # publishes in one transaction
CONCURRENCY = 4  # transactions in flight


class Outcome(Enum):
    """How a publish ended."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"  # its batch_id holds other readings already
    UNAVAILABLE = "unavailable"  # not stored (database away): no PUBACK, the client redelivers


@dataclass(slots=True)
class Pending:
    """One telemetry publish waiting for its group's commit."""

    tenant: str
    device_id: str
    rows: list[str]  # `device_id,metric,ts,value\n` lines
    batch_id: str | None  # the device's own batch id, or None
    packet_id: int | None = None
    dup: bool = False
    payload_digest: bytes = b""
    done: asyncio.Future[Outcome] | None = None  # set by GroupCommitter.submit
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


class GroupCommitter:
    """Commits queued publishes together: while one transaction runs, the next group gathers."""

    def __init__(self, pool: Pool, max_group: int = MAX_GROUP, concurrency: int = CONCURRENCY) -> None:
        self.pool = pool
        self.max_group = max_group
        self.concurrency = concurrency
        self._queue: list[Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.groups = 0
        self.stored = 0

    def start(self) -> None:
        """Start committing."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop; what is still queued is answered UNAVAILABLE (never acknowledged)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self._queue:
            if item.done is not None and not item.done.done():
                item.done.set_result(Outcome.UNAVAILABLE)
        self._queue.clear()

    def submit(self, item: Pending) -> asyncio.Future[Outcome]:
        """Queue a publish; the future resolves once its group committed (or failed)."""
        item.prepare()
        item.done = done = self._loop.create_future()
        self._queue.append(item)
        self._wake.set()
        return done

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task[None]] = set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                # several transactions at once: one waits for its WAL flush while the next one
                # gathers and inserts (PostgreSQL flushes concurrent commits together)
                await slots.acquire()
                group, self._queue = self._queue[: self.max_group], self._queue[self.max_group :]
                task = asyncio.create_task(self._commit_group(group, slots))
                running.add(task)
                task.add_done_callback(running.discard)

    async def _commit_group(self, group: list[Pending], slots: asyncio.Semaphore) -> None:
        try:
            try:
                outcomes = await self._commit(group)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("telemetry group of %d not stored: %s", len(group), exc)
                outcomes = [Outcome.UNAVAILABLE] * len(group)
                await asyncio.sleep(0.2)  # the database is away: do not spin
            self.groups += 1
            for item, outcome in zip(group, outcomes, strict=True):
                if item.done is not None and not item.done.done():
                    item.done.set_result(outcome)
        finally:
            slots.release()

    async def _commit(self, group: list[Pending]) -> list[Outcome]:
        """Store a group in one statement (one round trip, its own transaction): the redelivered
        duplicates found, the rest inserted, the packet ids of what was new remembered, and the
        digest of what an existing batch id holds read back."""
        rows = await self.pool.fetch(
            """WITH input AS (
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
               LEFT JOIN ins n USING (tenant, writer, batch_id)""",
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
        self.stored += stored
        if stored:
            READINGS_ACCEPTED.add(stored)
        return outcomes
