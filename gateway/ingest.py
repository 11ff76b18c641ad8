"""Telemetry publishes made durable in groups: the gateway gathers the publishes of many
connections and hands each group to the data service's accept path
(activities/telemetry_publishes.py: one statement, one transaction); each publish's PUBACK is
sent only once that transaction has committed. The ingestion shards take them from there, as
they take the batches of `POST /v1/telemetry`.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from activities.telemetry_publishes import Outcome, Publish, accept_publishes
from fleetflow.db import Pool

log = logging.getLogger(__name__)
MAX_GROUP = 2000  # publishes in one transaction
MAX_GROUP_BYTES = 64 * 1024 * 1024  # and their CSV bytes (PostgreSQL takes no message over 1 GB)
CONCURRENCY = 4  # transactions in flight
ROLLBACK_ATTEMPTS = 5  # of a group rolled back by PostgreSQL (deadlock, serialization failure)
# how long stop() waits for the groups being committed; then they are cancelled (unacknowledged)
STOP_WAIT_S = 10.0

Pending = Publish  # one telemetry publish waiting for its group's commit
Queued = tuple[Publish, "asyncio.Future[Outcome]"]
__all__ = ["CONCURRENCY", "MAX_GROUP", "GroupCommitter", "Outcome", "Pending"]


class GroupCommitter:
    """Commits queued publishes together: while one transaction runs, the next group gathers."""

    def __init__(
        self, pool: Pool, shards: int, max_group: int = MAX_GROUP, concurrency: int = CONCURRENCY
    ) -> None:
        self.pool = pool
        self.shards = shards  # the ingestion shards (settings.ingest_shards): a row for each
        self.max_group = max_group
        self.concurrency = concurrency
        self._queue: list[Queued] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # the groups being committed
        # connections kept between groups: handing one back to the pool costs a reset
        # statement (a round trip) per group
        self._idle: list[asyncpg.pool.PoolConnectionProxy[asyncpg.Record]] = []
        self.groups = 0
        self.stored = 0

    def start(self) -> None:
        """Start committing."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run())

    async def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop; the groups being committed end first (cancelled, unacknowledged, after wait_s),
        what is still queued is answered UNAVAILABLE (never acknowledged), and every connection
        goes back to the pool (a group ending after stop kept its connection: the pool's close
        waited for it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=wait_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for _, done in self._queue:
            if not done.done():
                done.set_result(Outcome.UNAVAILABLE)
        self._queue.clear()
        idle, self._idle = self._idle, []
        for conn in idle:
            await self.pool.release(conn)

    def submit(self, item: Pending) -> asyncio.Future[Outcome]:
        """Queue a publish; the future resolves once its group committed (or failed)."""
        item.prepare()
        done: asyncio.Future[Outcome] = self._loop.create_future()
        self._queue.append((item, done))
        self._wake.set()
        return done

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        running = self._running
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                # several transactions at once: one waits for its WAL flush while the next one
                # gathers and inserts (PostgreSQL flushes concurrent commits together)
                await slots.acquire()
                size, count = 0, 0
                for item, _ in self._queue[: self.max_group]:
                    size += len(item.payload)
                    if count and size > MAX_GROUP_BYTES:
                        break
                    count += 1
                group, self._queue = self._queue[:count], self._queue[count:]
                task = asyncio.create_task(self._commit_group(group, slots))
                running.add(task)
                task.add_done_callback(running.discard)

    async def _commit_group(self, queued: list[Queued], slots: asyncio.Semaphore) -> None:
        group = [item for item, _ in queued]
        try:
            try:
                outcomes = await self._commit(group)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("telemetry group of %d not stored: %s", len(group), exc)
                outcomes = [Outcome.UNAVAILABLE] * len(group)
                await asyncio.sleep(0.2)  # the database is away: do not spin
            self.groups += 1
            for (_, done), outcome in zip(queued, outcomes, strict=True):
                if not done.done():
                    done.set_result(outcome)
        finally:
            for _, done in queued:  # cancelled at stop: answered, never acknowledged
                if not done.done():
                    done.set_result(Outcome.UNAVAILABLE)
            slots.release()

    async def _commit(self, group: list[Pending]) -> list[Outcome]:
        for attempt in range(1, ROLLBACK_ATTEMPTS + 1):
            while self._idle and self._idle[-1].is_closed():  # the server went away meanwhile
                await self.pool.release(self._idle.pop())
            conn = self._idle.pop() if self._idle else await self.pool.acquire()
            try:
                outcomes = await accept_publishes(conn, group, shards=self.shards)
            except asyncpg.exceptions.TransactionRollbackError:
                # a deadlock with another group (a device's packet or batch ids taken in the
                # opposite order): nothing was stored; again, or every connection of the group
                # (of any tenant) was closed unacknowledged, as if the database were away
                await self.pool.release(conn)
                if attempt == ROLLBACK_ATTEMPTS:
                    raise
                log.info("telemetry group of %d rolled back, committing it again", len(group))
                continue
            except BaseException:
                await self.pool.release(conn)  # the pool resets it, or drops a broken one
                raise
            break
        self._idle.append(conn)
        self.stored += sum(len(p.rows) for p, o in zip(group, outcomes, strict=True) if o is Outcome.STORED)
        return outcomes
