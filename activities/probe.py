"""The `ping` every service answers for the system check."""

from __future__ import annotations

import asyncio
import os
import socket

from temporalio import activity

from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.db import Pool, ping

WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


async def probe(service: str, pool: Pool, request: ProbeRequest) -> ProbeResult:
    """Answer for service: its worker's name and whether its database answers.

    `hold_ms` keeps the probe running (heartbeating) so a check can prove that an
    activity survives the loss of the worker that held it.
    """
    remaining = request.hold_ms / 1000
    while remaining > 0:
        activity.heartbeat()
        step = min(0.2, remaining)
        await asyncio.sleep(step)
        remaining -= step
    error = await ping(pool)
    return ProbeResult(service=service, worker=WORKER_NAME, database_ok=error is None, database_error=error)
