"""Reconciliation: the last run's findings (`devices:read`: the caller's tenant; `consistency:admin`,
which a tenant's `admin` does not include: every tenant, and the ingestion claims) and
starting a run by hand (`consistency:admin`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from api.auth import Bearer, State, act_for_claims, api_claims, require, token_of
from api.models.consistency import ReconcileStarted
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.consistency import ConsistencyReport, ReconcileInput
from fleetflow.security import TokenClaims
from workflows.reconciliation import Reconciliation, reconcile_id

router = APIRouter(tags=["consistency"])
SCOPE = "consistency:admin"
Reader = Annotated[TokenClaims, Depends(require("devices:read"))]


async def _operator(state: State, credentials: Bearer) -> TokenClaims:
    """A token holding consistency:admin itself: a run repairs every tenant's devices."""
    claims = api_claims(state, token_of(credentials))
    if SCOPE not in claims.scopes:
        detail = f"this needs the {SCOPE!r} scope itself (admin does not include it)"
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=detail)
    act_for_claims(claims)
    return claims


Operator = Annotated[TokenClaims, Depends(_operator)]


@router.get("/v1/consistency", response_model=ConsistencyReport)
async def last_findings(state: State, caller: Reader) -> ConsistencyReport:
    """The last finished Reconciliation run: its findings per type, counts and samples."""
    everyone = SCOPE in caller.scopes
    return await state.devices.consistency_report(None if everyone else caller.tenant)


@router.post("/v1/consistency:run", status_code=status.HTTP_202_ACCEPTED, response_model=ReconcileStarted)
async def run_reconciliation(state: State, _: Operator) -> ReconcileStarted:
    """Start a Reconciliation run now ."""
    workflow_id = reconcile_id(datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ"))
    await state.temporal.start_workflow(
        Reconciliation.run,
        ReconcileInput(shards=state.settings.ingest_shards),
        id=workflow_id,
        task_queue=TaskQueue.ORCHESTRATION.value,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
    )
    return ReconcileStarted(workflow_id=workflow_id)
