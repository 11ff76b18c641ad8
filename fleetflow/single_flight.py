"""One read a key at a time: the callers arriving while it runs wait for it and share its answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """The reads under way, by key (e.g. a tenant's limits or rules)."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        """read()'s answer, from the read under way for key if there is one; a caller cancelled
        while it waits does not cancel the read for the others."""
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(read())
            running.add_done_callback(lambda done: self._ended(key, done))
        return await asyncio.shield(running)

    def forget(self, key: K) -> None:
        """No later caller joins the read under way for key (it began before a change)."""
        self._running.pop(key, None)

    def forget_all(self) -> None:
        """forget() for every key."""
        self._running.clear()

    def _ended(self, key: K, done: asyncio.Future[V]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        if not done.cancelled():
            done.exception()  # retrieved: each waiter got it already
