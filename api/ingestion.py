"""Keeps one TelemetryIngestion workflow running per shard."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.telemetry import IngestionInput
from fleetflow.temporal import device_search_attributes
from workflows.telemetry_ingestion import TelemetryIngestion, ingestion_id


async def ensure_ingestion(client: Client, shards: int) -> None:
    """Start the shard workflows that are not running; running ones are left alone."""
    for shard in range(shards):
        await client.start_workflow(
            TelemetryIngestion.run,
            IngestionInput(shard=shard, shards=shards),
            id=ingestion_id(shard),
            task_queue=TaskQueue.ORCHESTRATION.value,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            search_attributes=device_search_attributes("system", "ingestion"),
        )
