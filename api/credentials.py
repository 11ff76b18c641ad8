"""Device credential checks, cached briefly without ever letting a revoked credential through.

A positive check is kept for a few seconds. Every revocation (the device service's UPDATE of
`device.credentials`, whoever makes it) fires a PostgreSQL NOTIFY from a trigger; each API
process LISTENs (on its one shared connection, fleetflow/pg_listener.py) and drops the entry
at once. Two rules close the gaps:

- a check that was in flight when any revocation arrived is not cached (its answer may
  predate the revocation);
- while the LISTEN connection is down, nothing is cached and nothing cached is trusted.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from fleetflow.pg_listener import PgListener
from fleetflow.security import token_hash

CHANNEL = "device_credentials_revoked"
TTL_S = 5.0
MAX_ENTRIES = 100_000

# True/False, or until when the credential is good (a renewed one's overlap ends sooner than
# the cache's TTL may: it is never trusted past that moment)
Check = Callable[[str, str, str, str], Awaitable[bool | datetime | None]]


class CredentialCache:
    """Positive credential checks of one API process."""

    def __init__(
        self, listener: PgListener | str, check: Check, ttl_s: float = TTL_S, channel: str = CHANNEL
    ) -> None:
        # the process's shared listener, or a DSN: a listener of its own
        self.listener = listener if isinstance(listener, PgListener) else PgListener(listener)
        self.check = check
        self.ttl_s = ttl_s
        self.channel = channel  # its NOTIFY payload is the key to drop (`active`'s jti)
        self._entries: dict[str, tuple[str, float]] = {}  # jti -> (token hash, valid until)
        self._generation = 0  # bumped by every revocation and every loss of the listener
        self._subscribed = False

    @property
    def dsn(self) -> str:
        """The database the listener connects to."""
        return self.listener.dsn

    @dsn.setter
    def dsn(self, value: str) -> None:
        self.listener.dsn = value

    @property
    def listening(self) -> bool:
        """True while revocations reach this process."""
        return self.listener.listening

    async def start(self) -> None:
        """Listen for revocations (and keep listening across connection losses)."""
        if not self._subscribed:
            self._subscribed = True
            self.listener.on_reset(self._on_reset)
            await self.listener.subscribe(self.channel, self._on_revoked)
        await self.listener.start()

    async def stop(self) -> None:
        """Stop listening; nothing is cached afterwards."""
        await self.listener.stop()
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

    def _on_revoked(self, _channel: str, jti: str) -> None:
        self._generation += 1
        self._entries.pop(jti, None)

    def _on_reset(self, _listening: bool) -> None:
        # lost: nothing cached is trusted; back: whatever was revoked while nobody listened
        self._forget()
