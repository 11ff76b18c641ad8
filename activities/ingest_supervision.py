"""Supervising ingestion: every shard's TelemetryIngestion runs, and no batch stays claimed
by a run that is gone.

A shard whose workflow failed or was terminated is started again (the id-reuse policy
allows a new run once the previous one closed). Batches claimed by a run that is no
longer running (the run id is the second part of every window id) go back to
`pending` for the shard's new run; `data.store_window` locks a window's batches
first, so a reclaim never interleaves with a store still running for a dead run.
Part of the data service (it owns `data.ingest_batches`): `DataService` holds one and serves
`supervise_ingestion` through it.
"""

from __future__ import annotations

import logging

from temporalio.client import Client
from temporalio.client import WorkflowExecutionStatus as Status
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities import notification_facade
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.telemetry import (
    BATCH_QUARANTINED,
    INGESTION_WORKFLOW,
    MAX_ORPHANS,
    TELEMETRY_STORED,
    IngestionInput,
    Supervised,
    SuperviseIngestion,
    ingestion_id,
)
from fleetflow.db import Pool
from fleetflow.temporal import device_search_attributes

log = logging.getLogger(__name__)


async def start_shards(client: Client, shards: int) -> int:
    """Start the shard workflows that are not running; how many were not."""
    started = 0
    for shard in range(shards):
        if await _running(client, ingestion_id(shard)):
            continue
        # USE_EXISTING: a start racing this one (the API's, another supervisor's) is no error
        await client.start_workflow(
            INGESTION_WORKFLOW,
            IngestionInput(shard=shard, shards=shards),
            id=ingestion_id(shard),
            task_queue=TaskQueue.ORCHESTRATION.value,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            search_attributes=device_search_attributes("system", "ingestion"),
        )
        started += 1
    return started


async def _running(client: Client, workflow_id: str, run_id: str | None = None) -> bool:
    """True when the run (the latest when run_id is None) is running."""
    try:
        described = await client.get_workflow_handle(workflow_id, run_id=run_id).describe()
    except RPCError as exc:
        if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            return False
        raise
    return described.status == Status.RUNNING


class IngestionSupervision:
    """Keeps every shard running and reclaims the claims of dead runs; temporal (the process's
    client) lets it (re)start the shard workflows."""

    def __init__(self, pool: Pool, temporal: Client | None) -> None:
        self.pool = pool
        self.temporal = temporal

    async def supervise_ingestion(self, request: SuperviseIngestion) -> Supervised:
        """(Re)start the shards that are not running; put the batches claimed by runs that are
        not running back to pending. Idempotent."""
        if self.temporal is None:
            raise ApplicationError("the data service was built without a Temporal client", non_retryable=True)
        started = await start_shards(self.temporal, request.shards)
        claims = await self.pool.fetch(
            """SELECT DISTINCT split_part(window_id, '/', 1) AS workflow_id,
                      split_part(window_id, '/', 2) AS run_id
               FROM data.ingest_batches WHERE status = 'claimed'"""
        )
        reclaimed = 0
        for claim in claims:
            if await _running(self.temporal, claim["workflow_id"], claim["run_id"]):
                continue
            result = await self.pool.execute(
                """UPDATE data.ingest_batches SET status = 'pending', window_id = NULL
                   WHERE status = 'claimed' AND split_part(window_id, '/', 1) = $1
                     AND split_part(window_id, '/', 2) = $2""",
                claim["workflow_id"],
                claim["run_id"],
            )
            count = int(str(result).split()[-1])
            reclaimed += count
            log.warning("reclaimed %d batches of %s run %s (not running)", count, *claim.values())
        return Supervised(started=started, reclaimed=reclaimed, orphans=await self._orphans())

    async def _orphans(self) -> list[str]:
        """Windows of the last hour that were stored, or whose batch was quarantined, but whose
        events were never recorded, by runs that are not running (a run killed between storing
        or quarantining and recording)."""
        # the runs first (a handful per shard and hour), then only dead runs' windows: what is
        # read stays bounded however many windows an hour of traffic makes
        runs = await self.pool.fetch(
            """SELECT DISTINCT split_part(window_id, '/', 1) AS workflow_id,
                      split_part(window_id, '/', 2) AS run_id
               FROM (SELECT window_id FROM data.windows
                     WHERE stored_at > now() - interval '1 hour'
                     UNION ALL
                     SELECT window_id FROM data.ingest_batches
                     WHERE status = 'quarantined'
                       AND quarantined_at > now() - interval '1 hour') recent"""
        )
        assert self.temporal is not None
        dead = [r["run_id"] for r in runs if not await _running(self.temporal, r["workflow_id"], r["run_id"])]
        if not dead:
            return []
        # the windows that should have their events (this service's tables), then which of
        # those events the notification service recorded (its facade)
        candidates = await self.pool.fetch(
            """SELECT window_id, tenant, event_id
               FROM (SELECT w.window_id, w.stored_at AS at, t.tenant,
                            w.window_id || '/' || t.tenant || '/' || $1 AS event_id
                     FROM data.windows w
                     CROSS JOIN LATERAL (SELECT min(k) AS tenant FROM jsonb_object_keys(w.by_tenant) k) t
                     WHERE w.stored_at > now() - interval '1 hour' AND t.tenant IS NOT NULL
                       AND split_part(w.window_id, '/', 2) = ANY($3::text[])
                     UNION
                     SELECT b.window_id, b.quarantined_at, b.tenant,
                            b.window_id || '/' || b.tenant || '/' || b.batch_id || '/' || $2
                     FROM data.ingest_batches b
                     WHERE b.status = 'quarantined'
                       AND b.quarantined_at > now() - interval '1 hour'
                       AND split_part(b.window_id, '/', 2) = ANY($3::text[])) unfinished
               ORDER BY at LIMIT $4""",
            TELEMETRY_STORED,
            BATCH_QUARANTINED,
            dead,
            MAX_ORPHANS * 10,
        )
        recorded = await notification_facade.recorded(
            self.pool, [(c["tenant"], c["event_id"]) for c in candidates]
        )
        orphans: list[str] = []
        for row in candidates:
            # a window may miss several events
            if (row["tenant"], row["event_id"]) not in recorded and row["window_id"] not in orphans:
                orphans.append(row["window_id"])
            if len(orphans) == MAX_ORPHANS:
                break
        return orphans
