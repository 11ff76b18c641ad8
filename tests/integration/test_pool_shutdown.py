"""A process's shutdown closes its database pool in bounded time, whatever still holds a
connection (asyncpg's close waits for every connection to come back)."""

from __future__ import annotations

import asyncio

from fleetflow.db import close_pool, create_pool


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
