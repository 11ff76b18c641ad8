"""Bounds on streaming exports: how many run at once, and for how long.

An export reads through a server-side cursor inside one transaction, for as long as its client
keeps reading. A slow or stalled client would otherwise hold a pool connection and an open
transaction for ever: enough of them exhaust the pool, and each blocks retention's DROP of the
partitions it reads. So an export takes a slot (per tenant and per process; 429 beyond), ends
at a deadline, and PostgreSQL ends its transaction once it idles past a timeout. A slot is
given back when its export ends, and in any case expires after the deadline (a response whose
body never started streaming never runs its own clean-up).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException, status

PER_TENANT = 2
PER_PROCESS = 8
DEADLINE_S = 600.0  # one export, from its first row to its last
IDLE_S = 30  # a transaction waiting this long for its client to read is ended by the server


class ExportSlots:
    """The exports running in this process, per tenant: slot id -> when it was taken."""

    def __init__(
        self, per_tenant: int = PER_TENANT, per_process: int = PER_PROCESS, expiry_s: float = DEADLINE_S + 60
    ) -> None:
        self.per_tenant = per_tenant
        self.per_process = per_process
        self.expiry_s = expiry_s
        self.running: dict[str, dict[int, float]] = {}
        self._ids = itertools.count()

    def take(self, tenant: str) -> int:
        """A slot for one export of tenant; 429 (retry in a minute) when none is free."""
        now = time.monotonic()
        for slots in self.running.values():
            for slot, taken in list(slots.items()):
                if now - taken > self.expiry_s:
                    del slots[slot]
        mine = self.running.setdefault(tenant, {})
        limit = None
        if len(mine) >= self.per_tenant:
            limit = self.per_tenant
        elif sum(len(s) for s in self.running.values()) >= self.per_process:
            limit = self.per_process
        if limit is not None:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                detail=f"{limit} exports are running already; retry when one ends",
                headers={"Retry-After": "60"},
            )
        slot = next(self._ids)
        mine[slot] = now
        return slot

    @contextmanager
    def held(self, tenant: str, slot: int) -> Iterator[None]:
        """Give the slot back however the export ends."""
        try:
            yield
        finally:
            self.running.get(tenant, {}).pop(slot, None)


EXPORTS = ExportSlots()
