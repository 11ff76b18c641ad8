"""Wake-ups for command long-polls: each API process LISTENs (on its one shared connection,
fleetflow/pg_listener.py) on `device_command_offered` (a new command for a device) and
`device_command_settled` (a command ended), NOTIFYed by a trigger on `device.commands`. While
the listener is up a notice is not lost, so a waiter re-reads only every LISTENING_RECHECK_S (a
held long-poll is not one query a second per device); every waiter is woken to re-read when the
listener is lost or back (notices meanwhile are gone), and re-reads every RECHECK_S while it is
down: a lost listener costs latency, never an answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

from fleetflow.contracts.commands import COMMAND_OFFERED_CHANNEL, COMMAND_SETTLED_CHANNEL
from fleetflow.pg_listener import PgListener

RECHECK_S = 1.0
LISTENING_RECHECK_S = 15.0


class CommandNotices:
    """The process's waiters, keyed by tenant + device (+ command), woken by its listener."""

    def __init__(self, listener: PgListener | str) -> None:
        # the process's shared listener, or a DSN: a listener of its own
        self.listener = listener if isinstance(listener, PgListener) else PgListener(listener)
        self._waiters: dict[tuple[str, ...], set[asyncio.Event]] = {}
        self._subscribed = False

    async def start(self) -> None:
        """Listen (and keep listening across connection losses)."""
        if not self._subscribed:
            self._subscribed = True
            self.listener.on_reset(self._on_reset)
            await self.listener.subscribe(COMMAND_OFFERED_CHANNEL, self._notice)
            await self.listener.subscribe(COMMAND_SETTLED_CHANNEL, self._notice)
        await self.listener.start()

    async def stop(self) -> None:
        """Stop listening."""
        await self.listener.stop()

    @property
    def listening(self) -> bool:
        """True while the listener is connected (and its notices arrive)."""
        return self.listener.listening

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    def _on_reset(self, _listening: bool) -> None:
        # lost: they nap RECHECK_S from now on; back: a notice sent while nobody listened is gone
        self._wake_all()

    def _notice(self, channel: str, payload: str) -> None:
        try:
            data = json.loads(payload)
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
