"""The one asyncpg pool of a process, and the idempotent schema migrations."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
from opentelemetry.instrumentation.utils import suppress_instrumentation

from fleetflow.errors import StartupError
from fleetflow.migrations import MIGRATIONS
from fleetflow.settings import redact_dsn

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    Pool = asyncpg.Pool[asyncpg.Record]
else:
    Pool = asyncpg.Pool

log = logging.getLogger(__name__)

# any constant shared by every process: serialises concurrent migrators
_MIGRATION_LOCK = 7_001_337


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """What asyncpg runs when a connection returns to the pool, without a span: otherwise
    every query of a traced request would come with a second span for the reset."""
    query = conn.get_reset_query()
    if query:
        with suppress_instrumentation():
            await conn.execute(query)


def unverified_tls(dsn: str, env: Mapping[str, str] | None = None) -> str | None:
    """Why the connection to a server on another host is not verified TLS, or None. asyncpg's
    default, like libpq's, is sslmode=prefer: encrypted only if the server offers it, and
    whoever answers is believed; that fallback must not go unnoticed."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", [""])[-1]
    if not host or host.startswith("/") or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    source = os.environ if env is None else env
    mode = query.get("sslmode", [source.get("PGSSLMODE") or "prefer"])[-1]
    if mode in ("verify-ca", "verify-full"):
        return None
    return (
        f"PostgreSQL at {host} with sslmode={mode}: the connection may be unencrypted and the "
        "server is not verified; add ?sslmode=verify-full&sslrootcert=<CA file> to DATABASE_URL"
    )


async def create_pool(dsn: str, *, size: int = 10, timeout: float = 10.0) -> Pool:
    """Open the process's pool; StartupError (without the password) when unreachable. A
    warning when the server is on another host and TLS is not verified (unverified_tls)."""
    if warning := unverified_tls(dsn):
        log.warning(warning)
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            timeout=timeout,
            init=_init_connection,
            reset=_reset,
            command_timeout=60,
        )
    except (TimeoutError, OSError, asyncpg.PostgresError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        raise StartupError(f"cannot reach PostgreSQL at {redact_dsn(dsn)}: {reason}") from None


CLOSE_TIMEOUT_S = 10.0


async def close_pool(pool: Pool, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Close the pool once its connections are released, for at most timeout_s; then close
    them anyway: a task that never gives its connection back must not hold the process's
    shutdown for ever (asyncpg's close waits for every connection)."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        log.warning("pool connections still in use after %g s at shutdown: closed anyway", timeout_s)
        pool.terminate()


async def migrate(pool: Pool) -> list[str]:
    """Apply pending migrations (one schema per service); safe to call from many processes."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                """CREATE SCHEMA IF NOT EXISTS fleetflow;
                CREATE TABLE IF NOT EXISTS fleetflow.schema_migrations (
                    name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM fleetflow.schema_migrations")}
            for name, sql in MIGRATIONS:
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO fleetflow.schema_migrations(name) VALUES ($1)", name)
                applied.append(name)
            await _dashboard_login(conn, os.environ.get(DASHBOARD_PASSWORD_ENV, ""))
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


DASHBOARD_PASSWORD_ENV = "FLEETFLOW_DASHBOARD_DB_PASSWORD"
DASHBOARD_ROLE = "fleetflow_dashboard"


async def _dashboard_login(conn: Any, password: str) -> None:
    """Let the dashboards' read-only role log in with password (set: no default credentials)."""
    if not password:
        return
    statement = await conn.fetchval(
        "SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)", DASHBOARD_ROLE, password
    )
    try:
        await conn.execute(statement)
    except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedObjectError) as exc:
        # a database user that may not manage roles: the platform runs, the dashboard cannot
        log.warning("%s cannot log in: %s", DASHBOARD_ROLE, exc)


async def select_one(pool: Pool) -> Any:
    """`SELECT 1`: whether the database answers (any failure is raised)."""
    return await pool.fetchval("SELECT 1")


async def ping(pool: Pool) -> str | None:
    """None when the database answers, else the reason it does not."""
    try:
        async with asyncio.timeout(3):
            await pool.fetchval("SELECT 1")
        return None
    except Exception as exc:  # any failure is the answer here
        return f"{type(exc).__name__}: {exc}"


def record_to_dict(record: asyncpg.Record | None) -> dict[str, Any] | None:
    """A row as a plain dict (None stays None)."""
    return None if record is None else dict(record.items())
