"""One PostgreSQL LISTEN connection per process, shared by everything in it that listens.

Subscribers name a channel and a callback `(channel, payload)`; the listener holds one
connection with a LISTEN per channel, reconnects with backoff when it is lost, and pings it so
a connection whose host went away silently (a cut link sends no RST) is noticed too.

Notifications are not queued for a listener that is away: whatever was sent while it was down
is gone. So every subscriber is told of each change of state through its `on_reset(listening)`:
False when the connection is lost (trust no cache from now on), True when it is back (drop
every cache: a notification meanwhile may have been missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

Notice = Callable[[str, str], None]  # (channel, payload)
Reset = Callable[[bool], None]  # listening?

BACKOFF_S = 0.5  # first wait before reconnecting; doubled each failure up to MAX_BACKOFF_S
MAX_BACKOFF_S = 10.0
PING_S = 15.0  # a silent connection is asked `SELECT 1` this often
PING_TIMEOUT_S = 10.0
APPLICATION_NAME = "fleetflow-listen"

log = logging.getLogger(__name__)


class PgListener:
    """The process's LISTEN connection: channel -> callbacks, reconnected with backoff."""

    def __init__(
        self,
        dsn: str,
        *,
        backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        name: str = APPLICATION_NAME,
    ) -> None:
        self.dsn = dsn
        self.name = name  # its application_name in pg_stat_activity
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._channels: dict[str, list[Notice]] = {}
        self._resets: list[Reset] = []
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._users = 0
        self.connects = 0  # connections made so far (the first one and every reconnect)

    @property
    def listening(self) -> bool:
        """True while notifications reach this process."""
        return self._conn is not None and not self._conn.is_closed()

    async def subscribe(self, channel: str, on_notice: Notice) -> None:
        """Call on_notice for every notification on channel from now on (while listening)."""
        new = channel not in self._channels
        self._channels.setdefault(channel, []).append(on_notice)
        if new and self.listening:
            assert self._conn is not None
            try:
                await self._conn.add_listener(channel, self._dispatch)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self._drop(self._conn)  # the reconnect LISTENs on every channel

    def on_reset(self, callback: Reset) -> None:
        """Call callback(listening) whenever the connection is lost (False) or made (True)."""
        self._resets.append(callback)

    async def start(self) -> None:
        """Connect (or keep trying in the background); one start per user, one connection."""
        self._users += 1
        if self._keeper is not None:
            return
        try:
            await self._connect()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("cannot LISTEN yet (%s); retrying in the background", exc)
        self._keeper = asyncio.create_task(self._keep())

    async def stop(self) -> None:
        """One user less; the last one closes the connection."""
        self._users = max(0, self._users - 1)
        if self._users or self._keeper is None:
            return
        self._keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._keeper
        self._keeper = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.remove_termination_listener(self._on_terminated)
            await conn.close()
        self._tell(False)

    # --- the connection ---------------------------------------------------------------

    async def _connect(self) -> None:
        conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
            self.dsn, timeout=PING_TIMEOUT_S, server_settings={"application_name": self.name}
        )
        try:
            # until none is left: a channel subscribed during an await here must be heard too
            # (subscribe skips the LISTEN while no connection is set)
            heard: set[str] = set()
            while pending := [c for c in self._channels if c not in heard]:
                for channel in pending:
                    await conn.add_listener(channel, self._dispatch)
                    heard.add(channel)
        except BaseException:
            await conn.close()
            raise
        conn.add_termination_listener(self._on_terminated)
        self._conn = conn
        self._lost.clear()
        self.connects += 1
        self._tell(True)  # whatever was sent while nobody listened is gone

    def _on_terminated(self, conn: object) -> None:
        self._drop(conn)

    def _drop(self, conn: object) -> None:
        if conn is not self._conn or self._conn is None:
            return
        self._conn = None
        self._tell(False)
        self._lost.set()

    async def _keep(self) -> None:
        backoff = self.backoff_s
        while True:
            if self._conn is None:
                try:
                    await self._connect()
                    log.info("LISTEN connection is back (channels: %s)", ", ".join(self._channels))
                    backoff = self.backoff_s
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    log.warning("cannot LISTEN (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=PING_S)
                continue
            await self._ping()

    async def _ping(self) -> None:
        conn = self._conn
        if conn is None:
            return
        if conn.is_closed():
            self._drop(conn)
            return
        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=PING_TIMEOUT_S)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("LISTEN connection does not answer (%s); reconnecting", exc)
            conn.terminate()
            self._drop(conn)

    # --- fan-out ----------------------------------------------------------------------

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        for callback in list(self._channels.get(channel, ())):
            try:
                callback(channel, str(payload))
            except Exception:
                log.exception("a subscriber of %s failed on a notification", channel)

    def _tell(self, listening: bool) -> None:
        for callback in list(self._resets):
            try:
                callback(listening)
            except Exception:
                log.exception("a subscriber failed on a listener reset")
