"""Starts telemetry ingestion: one TelemetryIngestion workflow per shard, and the
IngestionSupervisor that keeps them running from then on (not only at start-up)."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from activities.ingest_supervision import start_shards
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.telemetry import SUPERVISOR_ID, SuperviseIngestion
from fleetflow.temporal import device_search_attributes
from workflows.ingestion_supervisor import IngestionSupervisor


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
