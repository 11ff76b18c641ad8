"""The API's credential cache: fewer database checks, yet a revocation refuses the next request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from activities.device_reads import DeviceReadModel
from api.credentials import TTL_S, CredentialCache
from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.flows import active_device, contact
from tests.support import eventually


class CountingCheck:
    """The device service's check, counted; `gate` holds a check open when set."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self, tenant: str, device_id: str, jti: str, token: str) -> bool:
        self.calls += 1
        row = await self.pool.fetchval(
            "SELECT revoked_at IS NULL FROM device.credentials WHERE jti = $1 AND device_id = $2",
            jti,
            device_id,
        )
        if self.gate is not None:
            await self.gate.wait()
        return bool(row)


@pytest.fixture
async def credential(api: httpx.AsyncClient, pool: Pool) -> tuple[str, str, str]:
    """(device id, jti, token) of a fresh active device of tenant acme."""
    device_id, token = await active_device(api)
    jti = await pool.fetchval("SELECT jti FROM device.credentials WHERE device_id = $1", device_id)
    return device_id, jti, token


@pytest.fixture
async def cache(settings: Settings, pool: Pool) -> AsyncIterator[tuple[CredentialCache, CountingCheck]]:
    check = CountingCheck(pool)
    assert settings.database_url
    cache = CredentialCache(settings.database_url, check, ttl_s=60)
    await cache.start()
    yield cache, check
    await cache.stop()


async def _revoke(pool: Pool, jti: str) -> None:
    await pool.execute("UPDATE device.credentials SET revoked_at = now() WHERE jti = $1", jti)


async def _unrevoke(pool: Pool, jti: str) -> None:
    await pool.execute("UPDATE device.credentials SET revoked_at = NULL WHERE jti = $1", jti)


async def test_a_cached_check_skips_the_database_until_a_revocation(
    cache: tuple[CredentialCache, CountingCheck], credential: tuple[str, str, str], pool: Pool
) -> None:
    store, check = cache
    device_id, jti, token = credential
    for _ in range(5):
        assert await store.active("acme", device_id, jti, token)
    assert check.calls == 1
    await _revoke(pool, jti)
    # the NOTIFY is delivered at commit; the eviction happens when the loop reads it
    await eventually(lambda: store.active("acme", device_id, jti, token), lambda ok: not ok, timeout_s=5)
    assert not await store.active("acme", device_id, jti, token)


async def test_a_check_in_flight_during_a_revocation_is_not_cached(
    cache: tuple[CredentialCache, CountingCheck], credential: tuple[str, str, str], pool: Pool
) -> None:
    store, check = cache
    device_id, jti, token = credential
    check.gate = asyncio.Event()
    in_flight = asyncio.create_task(store.active("acme", device_id, jti, token))
    await eventually(lambda: asyncio.sleep(0, check.calls), lambda calls: calls == 1)
    await _revoke(pool, jti)
    await asyncio.sleep(0.2)  # the notification arrives while the check is still open
    check.gate.set()
    assert await in_flight  # this answer was read before the revocation
    check.gate = None
    assert not await store.active("acme", device_id, jti, token)
    assert check.calls == 2


async def test_without_the_listener_nothing_is_trusted_from_the_cache(
    cache: tuple[CredentialCache, CountingCheck], credential: tuple[str, str, str], pool: Pool
) -> None:
    store, check = cache
    device_id, jti, token = credential
    assert await store.active("acme", device_id, jti, token)
    dsn, store.dsn = store.dsn, "postgresql://nobody@127.0.0.1:1/none"  # reconnecting fails for now
    await pool.execute(
        """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
           WHERE query LIKE 'LISTEN%' OR application_name = 'fleetflow-listen'"""
    )
    await eventually(lambda: asyncio.sleep(0, store.listening), lambda up: not up, timeout_s=5)
    calls = check.calls
    for _ in range(3):
        assert await store.active("acme", device_id, jti, token)
    assert check.calls == calls + 3  # every request asked the database
    store.dsn = dsn
    await eventually(lambda: asyncio.sleep(0, store.listening), lambda up: up, timeout_s=10)
    await _revoke(pool, jti)
    await eventually(lambda: store.active("acme", device_id, jti, token), lambda ok: not ok, timeout_s=5)


async def test_the_api_refuses_a_revoked_credential_before_the_cache_would_expire(
    api: httpx.AsyncClient, credential: tuple[str, str, str], pool: Pool
) -> None:
    """The API caches for TTL_S seconds; refusal comes from the notification, well before."""
    _, jti, token = credential
    headers = {"Authorization": f"Bearer {token}"}

    async def jobs() -> int:
        return (await api.get("/v1/device/jobs", headers=headers)).status_code

    for _ in range(5):
        assert await jobs() in (200, 204)
        assert await jobs() in (200, 204)  # from the cache
        await _revoke(pool, jti)
        await eventually(jobs, lambda code: code == 401, timeout_s=TTL_S / 2)
        assert (await contact(api, token)).status_code == 401
        await _unrevoke(pool, jti)
        await eventually(jobs, lambda code: code in (200, 204), timeout_s=TTL_S / 2)


async def test_a_renewed_credential_is_never_trusted_past_the_end_of_its_overlap(
    settings: Settings, api: httpx.AsyncClient, pool: Pool
) -> None:
    """The device service's real check answers until when a credential is good; with a
    60 s cache, a credential whose overlap ends in a second is refused once it has ended,
    though no revocation (NOTIFY) comes then."""
    device_id, token = await active_device(api)
    jti = await pool.fetchval("SELECT jti FROM device.credentials WHERE device_id = $1", device_id)
    reads = DeviceReadModel(pool)
    assert settings.database_url
    store = CredentialCache(settings.database_url, reads.credential_valid_until, ttl_s=60)
    await store.start()
    try:
        await pool.execute(
            "UPDATE device.credentials SET valid_until = now() + interval '1 second' WHERE jti = $1", jti
        )
        await eventually(lambda: store.active("acme", device_id, jti, token), lambda ok: ok)
        await eventually(lambda: store.active("acme", device_id, jti, token), lambda ok: not ok)
    finally:
        await store.stop()
