"""The data service: owns the `data` schema (telemetry readings)."""

from __future__ import annotations

from temporalio import activity

from activities.probe import probe
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.db import Pool


class DataService:
    """Activities of the `data` task queue."""

    queue = TaskQueue.DATA

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    @activity.defn(name="data.ping")
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)
