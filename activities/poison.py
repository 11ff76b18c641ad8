"""Poison pills: a window step that fails the same way on every retry says so, instead of
being retried for ever while its shard waits.

A failure of the infrastructure (connection lost, server shutting down, deadlock,
out of resources) is retried for ever, as before: nothing is wrong with the data.
Any other error that is still there at attempt POISON_ATTEMPT comes from the data
itself (an overflowing aggregate, a timestamp Python cannot compare, a row COPY
cannot read), so the activity fails with a non-retryable `PoisonWindow` whose message
is the error, and the ingestion workflow splits the window to isolate the bad batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from fleetflow.contracts.telemetry import POISON

POISON_ATTEMPT = 3
# SQLSTATE classes of failures that are not the data's: connection (08), transaction
# rollback (40: serialization, deadlock), resources (53), prerequisite state (55: lock not
# available), operator intervention (57: shutdown, cancel), system (58), internal (XX)
TRANSIENT_SQLSTATE = frozenset({"08", "40", "53", "55", "57", "58", "XX"})
MAX_REASON = 1000


def is_transient(exc: BaseException) -> bool:
    """True when exc says the infrastructure failed, not the data."""
    if isinstance(exc, OSError | asyncpg.InterfaceError | asyncpg.PostgresConnectionError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "")[:2] in TRANSIENT_SQLSTATE
    return False


def reason_of(exc: BaseException) -> str:
    """The error as a quarantine reason: its type and message, bounded."""
    return f"{type(exc).__name__}: {exc}"[:MAX_REASON]


@asynccontextmanager
async def poison_guard() -> AsyncIterator[None]:
    """Turn a data error that repeats until attempt POISON_ATTEMPT into a `PoisonWindow`."""
    try:
        yield
    except Exception as exc:
        if (
            isinstance(exc, ApplicationError)
            or is_transient(exc)
            or not activity.in_activity()
            or activity.info().attempt < POISON_ATTEMPT
        ):
            raise
        raise ApplicationError(reason_of(exc), type=POISON, non_retryable=True) from exc


def in_last_resort() -> bool:
    """True from attempt POISON_ATTEMPT on: steps that can isolate a bad item do it now."""
    return activity.in_activity() and activity.info().attempt >= POISON_ATTEMPT
