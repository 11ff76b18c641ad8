"""Device credential checks, cached briefly without ever letting a revoked credential through.

A positive check is kept for a few seconds. Every revocation (the device service's UPDATE of
`device.credentials`, whoever makes it) fires a PostgreSQL NOTIFY from a trigger; each API
process LISTENs and drops the entry at once. Two rules close the gaps:

- a check that was in flight when any revocation arrived is not cached (its answer may
  predate the revocation);
- while the LISTEN connection is down, nothing is cached and nothing cached is trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg

from fleetflow.security import token_hash

CHANNEL = "device_credentials_revoked"
TTL_S = 5.0
MAX_ENTRIES = 100_000
RECONNECT_S = 1.0

log = logging.getLogger(__name__)

# True/False, or until when the credential is good (a renewed one's overlap ends sooner than
# the cache's TTL may: it is never trusted past that moment)
Check = Callable[[str, str, str, str], Awaitable[bool | datetime | None]]


class CredentialCache:
    """Positive credential checks of one API process."""

    def __init__(self, dsn: str, check: Check, ttl_s: float = TTL_S, channel: str = CHANNEL) -> None:
        self.dsn = dsn
        self.check = check
        self.ttl_s = ttl_s
        self.channel = channel  # its NOTIFY payload is the key to drop (`active`'s jti)
        self._entries: dict[str, tuple[str, float]] = {}  # jti -> (token hash, valid until)
        self._generation = 0  # bumped by every revocation and every loss of the listener
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()

    @property
    def listening(self) -> bool:
        """True while revocations reach this process."""
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        """Listen for revocations (and keep listening across connection losses)."""
        await self._listen()
        self._keeper = asyncio.create_task(self._keep_listening())

    async def stop(self) -> None:
        """Stop listening; nothing is cached afterwards."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        self._forget()

    async def active(self, tenant: str, device_id: str, jti: str, token: str) -> bool:
        """True when the credential is valid and not revoked (from the cache or the database)."""
        digest = token_hash(token)
        now = time.monotonic()
        cached = self._entries.get(jti)
        if cached is not None and self.listening and cached[0] == digest and cached[1] > now:
            return True
        generation = self._generation
        answer = await self.check(tenant, device_id, jti, token)
        ttl_s = self.ttl_s
        if isinstance(answer, datetime):
            ttl_s = min(ttl_s, (answer - datetime.now(UTC)).total_seconds())
        ok = answer is not None and answer is not False
        # a revocation (or a lost listener) during the check may have made `ok` stale
        if ok and ttl_s > 0 and self.listening and generation == self._generation:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[jti] = (digest, now + ttl_s)
        return ok

    # --- the listener ----------------------------------------------------------

    def _forget(self) -> None:
        self._generation += 1
        self._entries.clear()

    def _on_revoked(self, _conn: object, _pid: int, _channel: str, jti: object) -> None:
        self._generation += 1
        self._entries.pop(str(jti), None)

    def _on_lost(self, _conn: object) -> None:
        self._forget()
        self._lost.set()

    async def _listen(self) -> None:
        conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(self.dsn)
        conn.add_termination_listener(self._on_lost)
        await conn.add_listener(self.channel, self._on_revoked)
        self._conn = conn
        self._forget()  # whatever was revoked while nobody listened

    async def _keep_listening(self) -> None:
        while True:
            await self._lost.wait()
            self._lost.clear()
            self._conn = None
            while self._conn is None:
                try:
                    await self._listen()
                    log.info("credential revocations are heard again")
                except (OSError, asyncpg.PostgresError) as exc:
                    log.warning("cannot listen for credential revocations (%s); checking every request", exc)
                    await asyncio.sleep(RECONNECT_S)
