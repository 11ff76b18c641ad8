"""Contracts of the Reconciliation workflow: what it checks, page by page, and what it found."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from fleetflow.contracts.common import Contract

RECONCILIATION_WORKFLOW = "Reconciliation"
MAX_PAGE = 1000
SAMPLES_PER_TYPE = 5


class FindingType(StrEnum):
    """What reconciliation finds, and whether it repairs it."""

    TWIN_MISSING = "twin_missing"  # an active device without a running twin: twin started
    TWIN_OF_RETIRED = "twin_of_retired"  # a running twin of a decommissioned/failed device: ended
    CREDENTIAL_OF_RETIRED = "credential_of_retired"  # a live credential of one: revoked
    FIRMWARE_MISMATCH = "firmware_mismatch"  # registry vs twin's reported version: reported only
    CLAIM_OF_DEAD_RUN = "claim_of_dead_run"  # ingest batches claimed by a dead run: back to pending


REPAIRED_TYPES = frozenset(
    {
        FindingType.TWIN_MISSING,
        FindingType.TWIN_OF_RETIRED,
        FindingType.CREDENTIAL_OF_RETIRED,
        FindingType.CLAIM_OF_DEAD_RUN,
    }
)


class ReconcileInput(Contract):
    """Input of Reconciliation: the same for every scheduled run; the cursor fields are the
    state a run carries through continue-as-new (empty at the start)."""

    shards: Annotated[int, Field(ge=1, le=4096)] = 1
    page_size: Annotated[int, Field(ge=1, le=MAX_PAGE)] = 500
    pages_per_run: Annotated[int, Field(ge=1, le=10_000)] = 200
    # carried through continue-as-new
    after_tenant: str = ""
    after_device: str = ""
    checked: Annotated[int, Field(ge=0)] = 0
    started_at: datetime | None = None


class ReconcilePage(Contract):
    """Input of `device.reconcile_devices`: the page of the registry after the key."""

    run_id: str
    after_tenant: str = ""
    after_device: str = ""
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] = 500


class ReconciledPage(Contract):
    """What one page checked and found; the last key read (None when the registry is done)."""

    checked: int
    findings: int = 0
    last_tenant: str | None = None
    last_device: str | None = None


CONSISTENCY_FINDING = "ConsistencyFinding"  # an event per finding reported, not repaired
CONSISTENCY_REPAIRED = "ConsistencyRepaired"  # an event per finding repaired


class ConsistencyEvents(Contract):
    """Input of `notification.record_consistency_events`: the findings of one checked page
    (devices after `after_*` up to `last_*`)."""

    run_id: str
    after_tenant: str
    after_device: str
    last_tenant: str
    last_device: str


class FinishReconciliation(Contract):
    """Input of `device.finish_reconciliation`: the run's totals (its findings are in the table)."""

    run_id: str
    started_at: datetime
    checked: int
    reclaimed: int


class FindingSample(Contract):
    """One finding."""

    tenant: str
    device_id: str
    detail: str
    repaired: bool


class FindingCount(Contract):
    """The findings of one type in the last run."""

    type: FindingType
    count: int
    repaired: bool
    samples: list[FindingSample] = []


class ConsistencyReport(Contract):
    """The last finished run (GET /v1/consistency); findings of the caller's tenant, or all."""

    run_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    devices_checked: int = 0
    findings: list[FindingCount] = []


class ReconcileResult(Contract):
    """Result of a Reconciliation run."""

    run_id: str
    checked: int
    reclaimed: int
