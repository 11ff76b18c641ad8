"""Reconciliation's checks of the device service: the registry against the twins (found through
Temporal visibility, one query per slice of a page, not one describe per device) and the
credentials; part of the device service (it owns the `device` schema, findings included).

One page of the registry per call, keyset by (tenant, device_id). Repairs: an active device
without a running twin gets one; a decommissioned or failed device's running twin is ended and
its live credentials revoked. A firmware version the twin reports that differs from the
registry's is reported, not repaired (the twin's ReportedFirmware search attribute says which
twins to ask; only those are queried): the registry's version changes only when a rollout job
succeeds (its audit trail), so a device flashed by hand is for an operator to look at. Devices
with an onboarding, decommissioning or rollout job in flight are left alone (they converge).
Every finding is one row of `device.consistency_findings` keyed by run, type, tenant and
device: a retried page records nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from fleetflow import identity
from fleetflow.contracts.common import TaskQueue, tenant_scoped_id
from fleetflow.contracts.consistency import (
    REPAIRED_TYPES,
    SAMPLES_PER_TYPE,
    ConsistencyReport,
    FindingCount,
    FindingSample,
    FindingType,
    FinishReconciliation,
    ReconciledPage,
    ReconcilePage,
)
from fleetflow.contracts.twin import EndTwin, TwinInput, TwinState
from fleetflow.db import Pool
from fleetflow.temporal import DEVICE_ID, REPORTED_FIRMWARE, device_search_attributes

log = logging.getLogger(__name__)

ACTOR = "reconciliation"
VISIBILITY_SLICE = 100  # device ids per visibility query (its text stays a few KB)
QUERY_CONCURRENCY = 16  # twin queries in flight for the firmware check
TWIN_WORKFLOW = "DeviceTwin"
BUSY_TYPES = ("DeviceOnboarding", "DeviceDecommission")

PAGE_SQL = """
SELECT d.tenant, d.device_id, d.status, d.firmware_version,
       t.config_schema, coalesce(c.config, t.default_config) AS config,
       EXISTS (SELECT 1 FROM device.credentials k
               WHERE k.tenant = d.tenant AND k.device_id = d.device_id
                 AND k.revoked_at IS NULL AND k.expires_at > now()) AS live_credential,
       EXISTS (SELECT 1 FROM device.rollout_jobs j
               WHERE j.tenant = d.tenant AND j.device_id = d.device_id
                 AND j.state IN ('queued', 'offered', 'downloading', 'installing')) AS rolling
FROM device.devices d
JOIN device.device_types t ON t.name = d.device_type
LEFT JOIN device.configurations c ON c.tenant = d.tenant AND c.device_id = d.device_id
WHERE (d.tenant, d.device_id) > ($1, $2)
ORDER BY d.tenant, d.device_id
LIMIT $3
"""


def _twin_id(tenant: str, device_id: str) -> str:
    """The twin's business id (as workflows.device_twin.twin_id)."""
    return tenant_scoped_id("twin", tenant, device_id)


class DeviceConsistency:
    """The device service's part of reconciliation; temporal finds, starts and ends twins."""

    def __init__(self, pool: Pool, temporal: Client | None) -> None:
        self.pool = pool
        self.temporal = temporal

    async def reconcile_devices(self, page: ReconcilePage) -> ReconciledPage:
        """Check (and repair what is safe in) one page of the registry; idempotent."""
        if self.temporal is None:
            raise ApplicationError(
                "the device service was built without a Temporal client", non_retryable=True
            )
        rows = await self.pool.fetch(PAGE_SQL, page.after_tenant, page.after_device, page.limit)
        if not rows:
            return ReconciledPage(checked=0)
        running, firmware = await self._running(rows)
        findings: list[tuple[FindingType, str, str, str]] = []
        repairs: list[Callable[[], Awaitable[None]]] = []
        firmware_checks: list[Any] = []
        for row in rows:
            key = (row["tenant"], row["device_id"])
            kinds = running.get(key, set())
            if any(kind in kinds for kind in BUSY_TYPES):
                continue  # an onboarding or retirement in flight converges by itself
            if row["status"] == "active":
                if TWIN_WORKFLOW not in kinds and not await self._twin_runs(*key):
                    repairs.append(partial(self._start_twin, row))
                    findings.append((FindingType.TWIN_MISSING, *key, "twin started"))
                elif not row["rolling"] and firmware.get(key) != row["firmware_version"]:
                    firmware_checks.append(row)  # a suspect: the twin itself is asked
            elif row["status"] in ("decommissioned", "failed"):
                if TWIN_WORKFLOW in kinds and await self._twin_runs(*key):
                    repairs.append(partial(self._end_twin, *key, row["status"]))
                    findings.append((FindingType.TWIN_OF_RETIRED, *key, f"{row['status']}: twin ended"))
                if row["live_credential"]:
                    repairs.append(partial(self._revoke, *key))
                    findings.append((FindingType.CREDENTIAL_OF_RETIRED, *key, f"{row['status']}: revoked"))
        findings += await self._firmware(firmware_checks)
        # recorded before repairing: an attempt killed half-way has its findings kept, and the
        # retry (which no longer sees what was repaired) repairs the rest
        if findings:
            await self.pool.executemany(
                """INSERT INTO device.consistency_findings (run_id, type, tenant, device_id, detail, repaired)
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
                [
                    (page.run_id, kind.value, t, d, detail, kind in REPAIRED_TYPES)
                    for kind, t, d, detail in findings
                ],
            )
        for repair in repairs:
            await repair()
        last = rows[-1]
        # what this page has recorded, by any attempt (a retry finds less to repair)
        recorded = await self.pool.fetchval(
            """SELECT count(*) FROM device.consistency_findings
               WHERE run_id = $1 AND (tenant, device_id) > ($2, $3) AND (tenant, device_id) <= ($4, $5)""",
            page.run_id,
            page.after_tenant,
            page.after_device,
            last["tenant"],
            last["device_id"],
        )
        return ReconciledPage(
            checked=len(rows), findings=recorded, last_tenant=last["tenant"], last_device=last["device_id"]
        )

    async def _running(
        self, rows: list[Any]
    ) -> tuple[dict[tuple[str, str], set[str]], dict[tuple[str, str], str]]:
        """Which workflow types run for each device of the page, and the firmware version its
        twin reports (visibility, by slices; a twin without the attribute is not in the second)."""
        assert self.temporal is not None
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            by_tenant[row["tenant"]].append(row["device_id"])
        found: dict[tuple[str, str], set[str]] = defaultdict(set)
        firmware: dict[tuple[str, str], str] = {}
        types = ", ".join(f"'{t}'" for t in ("DeviceTwin", *BUSY_TYPES))
        for tenant, ids in by_tenant.items():
            for start in range(0, len(ids), VISIBILITY_SLICE):
                # tenant and device ids are checked against their patterns: no quote can occur
                listed = ", ".join(f"'{i}'" for i in ids[start : start + VISIBILITY_SLICE])
                query = (
                    f"ExecutionStatus = 'Running' AND WorkflowType IN ({types}) "
                    f"AND TenantId = '{tenant}' AND DeviceId IN ({listed})"
                )
                async for execution in self.temporal.list_workflows(query, page_size=1000):
                    device = execution.typed_search_attributes.get(DEVICE_ID)
                    if device is not None:
                        found[(tenant, device)].add(execution.workflow_type)
                        reported = execution.typed_search_attributes.get(REPORTED_FIRMWARE)
                        if execution.workflow_type == TWIN_WORKFLOW and reported is not None:
                            firmware[(tenant, device)] = reported
        return found, firmware

    async def _twin_runs(self, tenant: str, device_id: str) -> bool:
        """What visibility said, confirmed on the twin itself: visibility lags a moment behind
        (a twin continuing as new shows closed until its new run is indexed). Suspects only."""
        assert self.temporal is not None
        try:
            described = await self.temporal.get_workflow_handle(_twin_id(tenant, device_id)).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return described.status == WorkflowExecutionStatus.RUNNING

    async def _start_twin(self, row: Any) -> None:
        assert self.temporal is not None
        # a decommissioning that began after the page was read (visibility had not shown it)
        # may have ended the twin already: no twin for a device no longer active
        status = await self.pool.fetchval(
            "SELECT status FROM device.devices WHERE tenant = $1 AND device_id = $2",
            row["tenant"],
            row["device_id"],
        )
        if status != "active":
            return
        await self.temporal.start_workflow(
            TWIN_WORKFLOW,
            TwinInput(
                tenant=row["tenant"],
                device_id=row["device_id"],
                config_schema=_json(row["config_schema"]),
                initial_desired=_json(row["config"]),
                initial_reported={"firmware_version": row["firmware_version"]},
            ),
            id=_twin_id(row["tenant"], row["device_id"]),
            task_queue=TaskQueue.ORCHESTRATION.value,
            # the device is active: a twin that ended before (terminated, say) runs again
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            search_attributes=device_search_attributes(row["tenant"], "twin", row["device_id"]),
        )
        log.warning("started the missing twin of %s/%s", row["tenant"], row["device_id"])

    async def _end_twin(self, tenant: str, device_id: str, status: str) -> None:
        assert self.temporal is not None
        try:
            await self.temporal.get_workflow_handle(_twin_id(tenant, device_id)).signal(
                "end", EndTwin(reason=f"reconciliation: device {status}", actor=_subject())
            )
        except RPCError as exc:  # ended meanwhile (visibility lags): nothing to do
            log.info("twin of %s/%s already gone: %s", tenant, device_id, exc.message)

    async def _revoke(self, tenant: str, device_id: str) -> None:
        # only while the device is still retired: an onboarding that took the failed device
        # over after the page was read (visibility had not shown it yet) issued a credential
        # of its own, which must stay live (it is committed after the status change)
        await self.pool.execute(
            """UPDATE device.credentials SET revoked_at = now()
               WHERE tenant = $1 AND device_id = $2 AND revoked_at IS NULL
                 AND EXISTS (SELECT 1 FROM device.devices d
                             WHERE d.tenant = $1 AND d.device_id = $2
                               AND d.status IN ('decommissioned', 'failed'))""",
            tenant,
            device_id,
        )

    async def _firmware(self, rows: list[Any]) -> list[tuple[FindingType, str, str, str]]:
        """Active devices whose twin reports a firmware version the registry does not have."""
        assert self.temporal is not None
        slots = asyncio.Semaphore(QUERY_CONCURRENCY)
        temporal = self.temporal

        async def check(row: Any) -> tuple[FindingType, str, str, str] | None:
            async with slots:
                try:
                    state: TwinState = await temporal.get_workflow_handle(
                        _twin_id(row["tenant"], row["device_id"])
                    ).query("get", result_type=TwinState)
                except RPCError:
                    return None  # ended meanwhile
            reported = state.reported.get("firmware_version")
            if reported is None or reported == row["firmware_version"]:
                return None
            detail = f"registry {row['firmware_version']!r}, twin reports {str(reported)[:64]!r}"
            return (FindingType.FIRMWARE_MISMATCH, row["tenant"], row["device_id"], detail)

        results = await asyncio.gather(*(check(row) for row in rows))
        return [r for r in results if r is not None]

    async def finish_reconciliation(self, finish: FinishReconciliation) -> None:
        """Record the run's totals and forget the findings of earlier runs; idempotent."""
        # a run still going (a run by hand overlapping the schedule's) keeps its findings:
        # it began before this one, yet its report is still to come
        others = await self.pool.fetch(
            "SELECT DISTINCT run_id FROM device.consistency_findings WHERE run_id <> $1 AND found_at < $2",
            finish.run_id,
            finish.started_at,
        )
        running = [r["run_id"] for r in others if await self._still_running(r["run_id"])]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO device.consistency_runs (run_id, started_at, finished_at, checked, reclaimed)
                   VALUES ($1, $2, now(), $3, $4) ON CONFLICT (run_id) DO NOTHING""",
                finish.run_id,
                finish.started_at,
                finish.checked,
                finish.reclaimed,
            )
            # only the newest finished run is kept, and nothing of runs that never finished
            # (cancelled, terminated) and began before this one
            await conn.execute(
                """DELETE FROM device.consistency_findings
                   WHERE run_id <> $1 AND found_at < $2 AND run_id <> ALL($3::text[])""",
                finish.run_id,
                finish.started_at,
                running,
            )
            await conn.execute("DELETE FROM device.consistency_runs WHERE run_id <> $1", finish.run_id)

    async def _still_running(self, run_id: str) -> bool:
        """Whether the Reconciliation of this id (its workflow id) is still going."""
        if self.temporal is None:
            return False
        try:
            described = await self.temporal.get_workflow_handle(run_id).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return described.status == WorkflowExecutionStatus.RUNNING

    async def report(self, tenant: str | None) -> ConsistencyReport:
        """The last finished run's findings: one tenant's, or every tenant's (tenant None)."""
        run = await self.pool.fetchrow(
            "SELECT * FROM device.consistency_runs ORDER BY finished_at DESC LIMIT 1"
        )
        if run is None:
            return ConsistencyReport()
        rows = await self.pool.fetch(
            """SELECT type, count(*) AS n,
                      (array_agg(jsonb_build_object('tenant', tenant, 'device_id', device_id,
                                 'detail', detail, 'repaired', repaired) ORDER BY tenant, device_id))[1:$3]
                          AS samples
               FROM device.consistency_findings
               WHERE run_id = $1 AND ($2::text IS NULL OR tenant = $2)
               GROUP BY type ORDER BY type""",
            run["run_id"],
            tenant,
            SAMPLES_PER_TYPE,
        )
        counts = [
            FindingCount(
                type=FindingType(r["type"]),
                count=r["n"],
                repaired=FindingType(r["type"]) in REPAIRED_TYPES,
                samples=[FindingSample.model_validate(_json(s)) for s in r["samples"]],
            )
            for r in rows
        ]
        checked = run["checked"]
        if tenant is not None:
            # the run's count is the whole fleet's, every tenant's devices: a tenant sees its own
            checked = await self.pool.fetchval(
                "SELECT count(*) FROM device.devices WHERE tenant = $1 AND created_at <= $2",
                tenant,
                run["finished_at"],
            )
        if tenant is None and run["reclaimed"]:
            counts.append(
                FindingCount(type=FindingType.CLAIM_OF_DEAD_RUN, count=run["reclaimed"], repaired=True)
            )
        return ConsistencyReport(
            run_id=run["run_id"],
            started_at=run["started_at"],
            finished_at=run["finished_at"],
            devices_checked=checked,
            findings=counts,
        )


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _subject() -> str:
    """The verified caller this activity acts for (a signal's payload must name it)."""
    try:
        return identity.current().actor.subject
    except RuntimeError:
        return ACTOR
