"""Wake-ups for command long-polls: each API process LISTENs on `device_command_offered` (a new
command for a device) and `device_command_settled` (a command ended), NOTIFYed by a trigger on
`device.commands`. While the listener is up a notice is not lost, so a waiter re-reads only every
LISTENING_RECHECK_S (a held long-poll is not one query a second per device); every waiter is woken
to re-read when the listener is lost or back (notices meanwhile are gone), and re-reads every
RECHECK_S while it is down: a lost listener costs latency, never an answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator

import asyncpg

from fleetflow.contracts.commands import COMMAND_OFFERED_CHANNEL, COMMAND_SETTLED_CHANNEL

RECHECK_S = 1.0
LISTENING_RECHECK_S = 15.0
RECONNECT_S = 1.0

log = logging.getLogger(__name__)


class CommandNotices:
    """The process's listener and the events of its waiters, keyed by tenant + device (+ command)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._waiters: dict[tuple[str, ...], set[asyncio.Event]] = {}
        self._listening = False

    async def start(self) -> None:
        """Listen (and keep listening across connection losses)."""
        self._keeper = asyncio.create_task(self._keep_listening())

    async def stop(self) -> None:
        """Stop listening."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def listening(self) -> bool:
        """True while the listener is connected (and its notices arrive)."""
        return self._listening and self._conn is not None and not self._conn.is_closed()

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def _keep_listening(self) -> None:
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    if self._listening:
                        self._listening = False
                        self._wake_all()  # they nap RECHECK_S from now on
                    self._conn = await asyncpg.connect(self.dsn)
                    await self._conn.add_listener(COMMAND_OFFERED_CHANNEL, self._notice)
                    await self._conn.add_listener(COMMAND_SETTLED_CHANNEL, self._notice)
                    self._listening = True
                    self._wake_all()  # a notice sent while nobody listened is gone: re-read
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("command notices: cannot listen (%s); waiters re-read every %ss", exc, RECHECK_S)
            await asyncio.sleep(RECONNECT_S)

    def _notice(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        try:
            data = json.loads(str(payload))
            tenant, device_id, command_id = (
                str(data["tenant"]),
                str(data["device_id"]),
                str(data["command_id"]),
            )
        except (ValueError, KeyError, TypeError):
            return
        if channel == COMMAND_OFFERED_CHANNEL:
            key = offered_key(tenant, device_id)
        else:
            key = settled_key(tenant, device_id, command_id)
        for event in self._waiters.get(key, ()):
            event.set()

    @contextlib.contextmanager
    def watching(self, key: tuple[str, ...]) -> Iterator[asyncio.Event]:
        """An event set by each notice for key while the block runs: clear it, read, then wait
        on it, and no notice between the read and the wait is missed."""
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[key]

    @property
    def recheck_s(self) -> float:
        """How long a waiter may go without re-reading its row (longer while listening)."""
        return LISTENING_RECHECK_S if self.listening else RECHECK_S

    @staticmethod
    async def nap(event: asyncio.Event, timeout: float) -> None:
        """Wait for the event, at most timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))


def offered_key(tenant: str, device_id: str) -> tuple[str, ...]:
    """The notices of a device's new commands."""
    return (COMMAND_OFFERED_CHANNEL, tenant, device_id)


def settled_key(tenant: str, device_id: str, command_id: str) -> tuple[str, ...]:
    """The notice of a command's end."""
    return (COMMAND_SETTLED_CHANNEL, tenant, device_id, command_id)
