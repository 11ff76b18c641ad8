"""A process's shutdown closes its database pool in bounded time, whatever still holds a
connection (asyncpg's close waits for every connection to come back)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from temporalio.client import Client

from activities.telemetry_publishes import Outcome, Publish
from fleetflow.db import Pool, close_pool, create_pool, migrate
from fleetflow.mqtt_topics import parse_telemetry, payload_digest, publish_target
from fleetflow.security import DeviceClaims
from fleetflow.settings import Settings
from gateway.connection import Connection
from gateway.ingest import GroupCommitter
from gateway.server import Gateway
from tests.support import eventually


async def test_a_connection_never_given_back_does_not_hold_the_shutdown(pg_dsn: str) -> None:
    pool = await create_pool(pg_dsn, size=2)
    await pool.acquire()  # a task stuck with its connection, never releasing it
    await asyncio.wait_for(close_pool(pool, timeout_s=0.5), 30)
    assert pool.is_closing()


async def test_released_connections_close_as_before(pg_dsn: str) -> None:
    pool = await create_pool(pg_dsn, size=2)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT 1") == 1
    await close_pool(pool, timeout_s=0.5)
    assert pool.is_closing()


async def test_a_group_commit_in_flight_at_the_gateways_stop_ends_and_gives_its_connection_back(
    pg_dsn: str,
) -> None:
    """The gateway stops its group committer, then closes its pool: a group still committing
    must have ended and handed its connection back by then, or the pool's close waits for it
    (10 s, then terminated, at every stop under load)."""
    assert await _stopped_while_a_group_waits(pg_dsn, wait_s=None) is Outcome.STORED


async def test_a_group_commit_stuck_at_the_gateways_stop_is_answered_unavailable(pg_dsn: str) -> None:
    # past stop's wait the group is cancelled: never acknowledged, its connection given back
    assert await _stopped_while_a_group_waits(pg_dsn, wait_s=0.1) is Outcome.UNAVAILABLE


async def _stopped_while_a_group_waits(pg_dsn: str, wait_s: float | None) -> Outcome:
    """Stop a committer whose group waits for a lock (released after stop ends when wait_s is
    set, else while stop waits); the group's outcome, once every connection is back."""
    pool = await create_pool(pg_dsn, size=3)
    tenant = f"stop-{uuid.uuid4().hex[:8]}"
    try:
        await migrate(pool)
        payload = json.dumps({"metric": "t", "value": 1.0}).encode()
        readings = parse_telemetry(payload, "d1", datetime.now(UTC))
        publish = Publish(tenant, "d1", readings.rows, None, 1, False, payload_digest(payload))
        committer = GroupCommitter(pool, 2)
        committer.start()
        async with pool.acquire() as other:
            holding = other.transaction()
            await holding.start()
            try:  # holds the publish's packet id: its group waits for this transaction
                await other.execute(
                    """INSERT INTO data.mqtt_packets (tenant, device_id, packet_id, digest, batch_id)
                       VALUES ($1, 'd1', 1, '\\x00', 'x')""",
                    tenant,
                )
                done = committer.submit(publish)
                await eventually(lambda: _blocked_by(pool, other), bool)
                if wait_s is None:
                    stopping = asyncio.ensure_future(committer.stop())
                    for _ in range(5):  # stop begins while the group waits
                        await asyncio.sleep(0)
                else:
                    await committer.stop(wait_s=wait_s)
            finally:
                await holding.rollback()
        if wait_s is None:
            await stopping
        assert done.done()
        assert pool.get_idle_size() == pool.get_size()  # the committer holds none
        return done.result()
    finally:
        await pool.execute("DELETE FROM data.mqtt_packets WHERE tenant = $1", tenant)
        await pool.execute("DELETE FROM data.ingest_batches WHERE tenant = $1", tenant)
        await close_pool(pool)


async def _blocked_by(pool: Pool, holder: Any) -> bool:
    pid = holder.get_server_pid()
    return bool(
        await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
        )
    )


async def test_the_gateways_stop_leaves_no_task_of_a_group_that_ended_while_it_waited(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A group committed while the gateway's stop waits for it has its publishes' early alert
    checks started (a last will here): they are ended with the gateway's other tasks, not left
    running past its stop, holding pool connections the pool's close then waits for."""
    pool = await create_pool(pg_dsn, size=3)
    tenant = f"stop-{uuid.uuid4().hex[:8]}"
    gateway = Gateway(Settings(keys_dir=tmp_path), pool, cast(Client, None), pg_dsn, "test-node")
    checks: list[str] = []

    async def check_rows(tenant: str, device_id: str, rows: list[str]) -> int:
        checks.append(device_id)
        await asyncio.Event().wait()  # a check still reading or starting when stop returns
        return 0

    gateway.early_alerts.check_rows = check_rows  # type: ignore[method-assign]
    try:
        await migrate(pool)
        gateway.committer.start()
        claims = DeviceClaims(tenant=tenant, device_id="d1", jti="j1")
        reading = {"metric": "t", "value": 1.0, "ts": datetime.now(UTC).isoformat()}
        will = json.dumps({"batch_id": "b1", "readings": [reading]})
        conn = cast(Connection, SimpleNamespace(claims=claims))
        async with pool.acquire() as other:
            holding = other.transaction()
            await holding.start()
            try:  # holds the will's batch id: its group waits for this transaction
                await other.execute(
                    """INSERT INTO data.ingest_batches
                           (tenant, writer, batch_id, bucket, readings, device_ids)
                       VALUES ($1, 'device:d1', 'b1', 0, 1, ARRAY['d1'])""",
                    tenant,
                )
                target = publish_target(tenant, "d1", f"tenants/{tenant}/devices/d1/telemetry")
                gateway._publish_will(conn, target, will.encode())
                await eventually(lambda: _blocked_by(pool, other), bool)
                stopping = asyncio.ensure_future(gateway.stop())
                await eventually(
                    _async(lambda: gateway.committer._task is not None and gateway.committer._task.done()),
                    bool,
                )
            finally:
                await holding.rollback()  # the group commits while stop waits for it
        await stopping
        assert checks == ["d1"]  # the will was stored, and its check started
        assert all(task.done() for task in gateway._tasks)
    finally:
        await pool.execute("DELETE FROM data.ingest_batches WHERE tenant = $1", tenant)
        await close_pool(pool)


def _async(probe: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def probed() -> bool:
        return probe()

    return probed
