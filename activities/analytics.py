"""The analytics service: owns the `analytics` schema (rules and alerts)."""

from __future__ import annotations

from temporalio import activity

from activities.probe import probe
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.db import Pool


class AnalyticsService:
    """Activities of the `analytics` task queue."""

    queue = TaskQueue.ANALYTICS

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    @activity.defn(name="analytics.ping")
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)
