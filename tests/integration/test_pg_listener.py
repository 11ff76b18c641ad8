"""The process's one LISTEN connection (fleetflow/pg_listener.py), on the session's PostgreSQL:
every subscriber shares it, a reconnect tells them all to drop what they cached, and a tenant's
profile changed through one process reaches another's cached limits without waiting for a TTL."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from api.command_notices import CommandNotices
from api.credentials import CredentialCache
from api.quotas import Quotas
from api.revocations import TokenRevocations
from fleetflow import pg_listener
from fleetflow.contracts.tenants import TenantLimits, TenantProfile
from fleetflow.db import Pool
from fleetflow.embedded_pg import database_url
from fleetflow.pg_listener import PgListener
from fleetflow.settings import Settings
from tests.support import eventually


def frozen() -> float:
    """A clock that never moves: a cached entry never expires by time."""
    return 1000.0


async def never_checked(*_: str) -> bool:
    return True


@pytest.fixture
async def listener(settings: Settings) -> AsyncIterator[PgListener]:
    listening = PgListener(database_url(settings), name=f"ff-test-{os.urandom(4).hex()}", backoff_s=0.1)
    yield listening
    while listening._users:  # every subscriber's start, undone
        await listening.stop()


async def _backends(pool: Pool, name: str) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name))


async def test_every_subscriber_shares_one_connection_and_a_reconnect_resets_them_all(
    listener: PgListener, pool: Pool
) -> None:
    resets: list[bool] = []
    listener.on_reset(resets.append)
    cache = CredentialCache(listener, never_checked)
    notices = CommandNotices(listener)
    revocations = TokenRevocations(pool, listener)
    quotas = Quotas(pool, TenantLimits(), clock=frozen)
    await quotas.listen(listener)
    for part in (cache, notices, revocations):
        await part.start()
    assert await _backends(pool, listener.name) == 1
    assert cache.listening and notices.listening
    assert await cache.active("acme", "d1", "jti-1", "token")  # cached now
    await quotas.limits("acme")
    assert quotas.known_limits("acme")[1]  # fresh
    resets.clear()

    await pool.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", listener.name
    )
    await eventually(lambda: asyncio.sleep(0, resets), lambda seen: seen[-1:] == [True], timeout_s=30)
    assert resets == [False, True]  # lost, then back
    assert not quotas.known_limits("acme")[1]  # read again: a change meanwhile was not heard
    assert cache._entries == {}  # nothing cached from before the loss is trusted
    assert await _backends(pool, listener.name) == 1
    for part in (cache, notices, revocations):
        await part.stop()
    assert await _backends(pool, listener.name) == 0  # the last user closed it


async def test_a_profile_changed_by_one_process_reaches_the_others_cached_limits(
    settings: Settings, pool: Pool
) -> None:
    tenant = f"pl-{os.urandom(4).hex()}"
    listeners = [PgListener(database_url(settings), name=f"ff-test-{os.urandom(4).hex()}") for _ in range(2)]
    first, second = (Quotas(pool, TenantLimits(), clock=frozen) for _ in range(2))
    try:
        for quotas, listening in zip((first, second), listeners, strict=True):
            await quotas.listen(listening)
            await listening.start()
        assert (await second.limits(tenant)).max_devices == TenantLimits().max_devices  # cached, for ever
        await first.set_profile(tenant, TenantProfile(max_devices=7), "test")

        async def seen() -> int:
            return (await second.limits(tenant)).max_devices

        await eventually(seen, lambda n: n == 7, timeout_s=30)
    finally:
        for listening in listeners:
            await listening.stop()


async def test_a_channel_subscribed_while_the_connection_is_being_made_is_heard(
    listener: PgListener, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    heard: list[str] = []
    first = f"ff_a_{os.urandom(4).hex()}"
    late = f"ff_b_{os.urandom(4).hex()}"
    await listener.subscribe(first, lambda _channel, payload: heard.append(payload))
    add_listener = asyncpg.Connection.add_listener

    async def subscribing_meanwhile(conn: asyncpg.Connection[Any], channel: str, callback: Any) -> None:
        # another part of the process subscribes while the LISTENs of the new connection run
        if channel == first:
            await listener.subscribe(late, lambda _channel, payload: heard.append(payload))
        await add_listener(conn, channel, callback)

    monkeypatch.setattr(asyncpg.Connection, "add_listener", subscribing_meanwhile)
    await listener.start()
    monkeypatch.undo()
    await pool.execute(f"NOTIFY {late}, 'late'")
    await eventually(lambda: asyncio.sleep(0, heard), lambda seen: seen == ["late"], timeout_s=30)


async def test_a_connection_that_stops_answering_is_replaced_and_subscribers_reset(
    listener: PgListener, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose link is cut sends no RST: the listener's ping notices the silence."""
    monkeypatch.setattr(pg_listener, "PING_S", 0.2)
    monkeypatch.setattr(pg_listener, "PING_TIMEOUT_S", 1.0)
    resets: list[bool] = []
    listener.on_reset(resets.append)
    await listener.subscribe(f"ff_c_{os.urandom(4).hex()}", lambda _channel, _payload: None)
    await listener.start()
    backend = await pool.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", listener.name
    )
    os.kill(backend, signal.SIGSTOP)  # the server side goes silent, the socket stays open
    try:
        await eventually(
            lambda: asyncio.sleep(0, resets), lambda seen: seen[-2:] == [False, True], timeout_s=30
        )
    finally:
        os.kill(backend, signal.SIGCONT)
    assert listener.listening
    assert listener.connects == 2
    # the silent one was let go (its backend ends once it runs again and finds the socket closed)
    await eventually(lambda: _backends(pool, listener.name), lambda n: n == 1, timeout_s=30)
