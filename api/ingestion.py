"""Starts telemetry ingestion: one TelemetryIngestion workflow per shard, and the
IngestionSupervisor that keeps them running from then on (not only at start-up); the API
looks again every WATCH_S, so a supervisor that was terminated (which nothing else would
start again) is back within that."""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from activities.ingest_supervision import start_shards
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.telemetry import SUPERVISOR_ID, SuperviseIngestion
from fleetflow.temporal import device_search_attributes
from workflows.ingestion_supervisor import IngestionSupervisor

log = logging.getLogger(__name__)
# how often a running API makes sure the supervisor and the shards run: the supervisor watches
# the shards, this watches the supervisor
WATCH_S = 15.0


async def ensure_ingestion(client: Client, shards: int) -> None:
    """Start the shard workflows and their supervisor where not running; running ones are left
    alone. A new run is allowed after a failed or terminated one (ALLOW_DUPLICATE)."""
    await start_shards(client, shards)
    await client.start_workflow(
        IngestionSupervisor.run,
        SuperviseIngestion(shards=shards),
        id=SUPERVISOR_ID,
        task_queue=TaskQueue.ORCHESTRATION.value,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=device_search_attributes("system", "ingestion"),
    )


async def watch_ingestion(client: Client, shards: int, interval_s: float = WATCH_S) -> None:
    """ensure_ingestion every interval_s until cancelled; a failed look is logged and retried."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await ensure_ingestion(client, shards)
        except Exception:  # Temporal away for a while: look again next time
            log.warning("could not make sure ingestion runs", exc_info=True)
