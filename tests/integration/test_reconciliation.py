"""Reconciliation: each finding type, made on the real stack, repaired or reported by a run
started through POST /v1/consistency:run, and shown by GET /v1/consistency."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
from temporalio.client import Client, WorkflowExecutionStatus

from activities.device_consistency import DeviceConsistency
from fleetflow.contracts.consistency import FinishReconciliation, ReconcilePage
from fleetflow.db import Pool
from tests.integration.flows import AUTH, active_device, contact
from tests.support import bearer, eventually
from workflows.device_twin import twin_id

OPERATOR = bearer("acme", scopes=["consistency:admin", "devices:read"])


async def _reconcile(api: httpx.AsyncClient, client: Client) -> None:
    started = await api.post("/v1/consistency:run", headers=OPERATOR)
    assert started.status_code == 202, started.text
    await client.get_workflow_handle(started.json()["workflow_id"]).result()


def _finding(report: dict[str, Any], kind: str, device_id: str) -> dict[str, Any] | None:
    for group in report["findings"]:
        if group["type"] == kind:
            for sample in group["samples"]:
                if sample["device_id"] == device_id:
                    return dict(sample)
    return None


async def _findings_of(api: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, Any]:
    response = await api.get("/v1/consistency", headers=auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_an_active_device_without_a_twin_gets_one(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    device_id, _ = await active_device(api)
    twin = client.get_workflow_handle(twin_id("acme", device_id))
    await twin.terminate("test: the twin is lost")
    await _reconcile(api, client)
    assert (await twin.describe()).status == WorkflowExecutionStatus.RUNNING
    found = _finding(await _findings_of(api, AUTH), "twin_missing", device_id)
    assert found is not None and found["repaired"]
    # an event in the store, and the gauge of the last run
    events = await pool.fetch(
        """SELECT type, data FROM notification.events
           WHERE tenant = 'acme' AND device_id = $1 AND type LIKE 'Consistency%'""",
        device_id,
    )
    assert [(e["type"], e["data"]["finding"]) for e in events] == [("ConsistencyRepaired", "twin_missing")]
    metrics = await eventually(
        lambda: api.get("/metrics"), lambda r: "fleetflow_consistency_findings" in r.text, timeout_s=20
    )
    assert re.search(r'fleetflow_consistency_findings\{[^}]*type="twin_missing"[^}]*\} [1-9]', metrics.text)


async def test_a_retired_devices_twin_and_credential_are_ended(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    device_id, credential = await active_device(api)
    # a retirement that stopped after the registry said so (its workflow lost)
    await pool.execute(
        "UPDATE device.devices SET status = 'decommissioned' WHERE tenant = 'acme' AND device_id = $1",
        device_id,
    )
    await _reconcile(api, client)
    twin = client.get_workflow_handle(twin_id("acme", device_id))
    assert (await twin.describe()).status == WorkflowExecutionStatus.COMPLETED
    assert (await contact(api, credential)).status_code == 401
    report = await _findings_of(api, AUTH)
    assert _finding(report, "twin_of_retired", device_id) is not None
    assert _finding(report, "credential_of_retired", device_id) is not None


async def test_a_firmware_mismatch_is_reported_not_repaired(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    device_id, credential = await active_device(api)
    # the device says it runs 9.9.9 (flashed by hand): no rollout told the registry
    reported = await api.post(
        "/v1/device/twin/reported",
        json={"reported": {"firmware_version": "9.9.9"}},
        headers={"Authorization": f"Bearer {credential}"},
    )
    assert reported.status_code == 202, reported.text
    # the twin publishes what its device reports: the Web UI (and reconciliation) find it by that
    query = f"ReportedFirmware = '9.9.9' AND DeviceId = '{device_id}' AND TenantId = 'acme'"

    async def listed() -> list[str]:
        return [w.id async for w in client.list_workflows(query)]

    assert await eventually(listed, lambda ids: len(ids) == 1) == [twin_id("acme", device_id)]
    await _reconcile(api, client)
    found = _finding(await _findings_of(api, AUTH), "firmware_mismatch", device_id)
    assert found is not None and not found["repaired"] and "9.9.9" in found["detail"]
    version = await pool.fetchval(
        "SELECT firmware_version FROM device.devices WHERE tenant = 'acme' AND device_id = $1", device_id
    )
    assert version != "9.9.9"


async def test_a_claim_of_a_dead_run_goes_back_to_pending(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    batch_id = f"dead-{uuid.uuid4().hex[:8]}"
    # bucket -1: no shard claims it again, so what the run leaves is what the test sees
    await pool.execute(
        """INSERT INTO data.ingest_batches (tenant, batch_id, bucket, readings, device_ids, status, window_id)
           VALUES ('acme', $1, -1, 1, ARRAY['ghost'], 'claimed', $2)""",
        batch_id,
        f"ingest-0/{uuid.uuid4()}/5",
    )
    await _reconcile(api, client)
    status = await pool.fetchval(
        "SELECT status FROM data.ingest_batches WHERE tenant = 'acme' AND batch_id = $1", batch_id
    )
    assert status == "pending"
    # a pending batch of no shard would be claimed by the next test that claims bucket -1
    await pool.execute("DELETE FROM data.ingest_batches WHERE tenant = 'acme' AND batch_id = $1", batch_id)


async def test_a_tenant_sees_its_own_findings_only(api: httpx.AsyncClient, client: Client) -> None:
    other = bearer("globex", scopes=["devices:read"])
    device_id, _ = await active_device(api)
    await client.get_workflow_handle(twin_id("acme", device_id)).terminate("test")
    await _reconcile(api, client)
    report = await _findings_of(api, other)
    assert all(s["tenant"] == "globex" for g in report["findings"] for s in g["samples"])
    assert _finding(await _findings_of(api, OPERATOR), "twin_missing", device_id) is not None
    # a tenant's admin may not start a fleet-wide run
    refused = await api.post("/v1/consistency:run", headers=bearer("acme", scopes=["admin"]))
    assert refused.status_code == 403


async def test_the_same_device_id_in_two_tenants_is_two_devices(
    api: httpx.AsyncClient, client: Client
) -> None:
    device_id = f"twin-{uuid.uuid4().hex[:8]}"
    globex = bearer("globex")
    await active_device(api, device_id=device_id)
    await active_device(api, device_id=device_id, auth=globex)
    acme_twin = client.get_workflow_handle(twin_id("acme", device_id))
    kept = (await acme_twin.describe()).run_id
    # globex's twin is lost; the operator who runs the reconciliation is of acme
    await client.get_workflow_handle(twin_id("globex", device_id)).terminate("test: globex's twin is lost")
    await _reconcile(api, client)
    globex_reader = bearer("globex", scopes=["devices:read"])
    assert _finding(await _findings_of(api, globex_reader), "twin_missing", device_id) is not None
    assert (
        _finding(await _findings_of(api, bearer("acme", scopes=["devices:read"])), "twin_missing", device_id)
        is None
    )
    described = await client.get_workflow_handle(twin_id("globex", device_id)).describe()
    assert described.status == WorkflowExecutionStatus.RUNNING
    # acme's device of the same id kept its twin, untouched
    assert (await acme_twin.describe()).run_id == kept
    globex_twin = client.get_workflow_handle(twin_id("globex", device_id))
    twin = await globex_twin.query("get")
    assert twin["tenant"] == "globex"
    # its first workflow task ran (the query needed it) and took the start's identity
    assert (await globex_twin.describe()).status == WorkflowExecutionStatus.RUNNING


async def test_findings_of_a_run_that_never_finished_are_forgotten(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    # a run cancelled half-way recorded a finding and never its totals
    await pool.execute(
        """INSERT INTO device.consistency_findings
               (run_id, type, tenant, device_id, detail, repaired, found_at)
           VALUES ('reconcile-cancelled', 'twin_missing', 'acme', 'ghost', 'twin started', true,
                   now() - interval '1 hour')"""
    )
    await _reconcile(api, client)
    left = await pool.fetchval(
        "SELECT count(*) FROM device.consistency_findings WHERE run_id = 'reconcile-cancelled'"
    )
    assert left == 0


class _StaleVisibility(DeviceConsistency):
    """Visibility that has not indexed the twins yet (it lags the twin's own state a moment,
    e.g. while a twin continues as new): every twin looks closed, every workflow absent."""

    async def _running(self, rows: list[Any]) -> tuple[dict[Any, set[str]], dict[Any, str]]:
        return {}, {}


async def test_a_twin_visibility_has_not_indexed_yet_is_no_finding(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    device_id, _ = await active_device(api)
    twin = client.get_workflow_handle(twin_id("acme", device_id))
    before = (await twin.describe()).run_id
    run_id = f"reconcile-stale-{uuid.uuid4().hex[:6]}"
    checker = _StaleVisibility(pool, client)
    # the page of this device alone: the key just before it, limit 1
    page = await checker.reconcile_devices(
        ReconcilePage(run_id=run_id, after_tenant="acme", after_device=device_id[:-1], limit=1)
    )
    assert (page.last_tenant, page.last_device) == ("acme", device_id)
    assert page.findings == 0
    assert (await twin.describe()).run_id == before


async def test_a_run_still_going_keeps_its_findings_when_an_overlapping_run_finishes(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    # a run by hand began before the schedule's run and is still going when the schedule's
    # run finishes; any running workflow stands for it (an active device's twin)
    device_id, _ = await active_device(api)
    still_going = twin_id("acme", device_id)
    await pool.execute(
        """INSERT INTO device.consistency_findings
               (run_id, type, tenant, device_id, detail, repaired, found_at)
           VALUES ($1, 'twin_missing', 'acme', $2, 'twin started', true, now() - interval '1 minute')""",
        still_going,
        device_id,
    )
    finished = f"reconcile-overlap-{uuid.uuid4().hex[:6]}"
    checker = DeviceConsistency(pool, client)
    now = await pool.fetchval("SELECT now()")
    await checker.finish_reconciliation(
        FinishReconciliation(run_id=finished, started_at=now, checked=0, reclaimed=0)
    )
    left = await pool.fetchval(
        "SELECT count(*) FROM device.consistency_findings WHERE run_id = $1", still_going
    )
    assert left == 1


class _TakenOverMeanwhile(DeviceConsistency):
    """An onboarding takes the failed device over (and issues its credential) after the page
    was read, before visibility shows it."""

    async def _running(self, rows: list[Any]) -> tuple[dict[Any, set[str]], dict[Any, str]]:
        for row in rows:
            await self.pool.execute(
                "UPDATE device.devices SET status = 'active' WHERE tenant = $1 AND device_id = $2",
                row["tenant"],
                row["device_id"],
            )
        return {}, {}


async def test_a_credential_issued_by_an_onboarding_taking_over_meanwhile_stays_live(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    device_id, _ = await active_device(api)
    await pool.execute(
        "UPDATE device.devices SET status = 'failed' WHERE tenant = 'acme' AND device_id = $1", device_id
    )
    checker = _TakenOverMeanwhile(pool, client)
    run_id = f"reconcile-takeover-{uuid.uuid4().hex[:6]}"
    await checker.reconcile_devices(
        ReconcilePage(run_id=run_id, after_tenant="acme", after_device=device_id[:-1], limit=1)
    )
    live = await pool.fetchval(
        """SELECT count(*) FROM device.credentials
           WHERE tenant = 'acme' AND device_id = $1 AND revoked_at IS NULL""",
        device_id,
    )
    assert live >= 1


async def test_a_tenant_sees_the_count_of_its_own_devices_checked_not_the_fleets(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    await active_device(api)  # acme's devices are none of globex's business
    await _reconcile(api, client)
    report = await _findings_of(api, bearer("globex", scopes=["devices:read"]))
    own = await pool.fetchval("SELECT count(*) FROM device.devices WHERE tenant = 'globex'")
    assert report["devices_checked"] <= own
    everyone = await _findings_of(api, OPERATOR)
    assert everyone["devices_checked"] > own


class _RetiredMeanwhile(DeviceConsistency):
    """A decommissioning ends the device (and its twin) after the page was read, before
    visibility shows it."""

    async def _running(self, rows: list[Any]) -> tuple[dict[Any, set[str]], dict[Any, str]]:
        for row in rows:
            await self.pool.execute(
                "UPDATE device.devices SET status = 'decommissioned' WHERE tenant = $1 AND device_id = $2",
                row["tenant"],
                row["device_id"],
            )
        return {}, {}


async def test_no_twin_is_started_for_a_device_decommissioned_meanwhile(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    device_id, _ = await active_device(api)
    twin = client.get_workflow_handle(twin_id("acme", device_id))
    await twin.terminate("test: the decommissioning ended it")
    checker = _RetiredMeanwhile(pool, client)
    run_id = f"reconcile-retired-{uuid.uuid4().hex[:6]}"
    await checker.reconcile_devices(
        ReconcilePage(run_id=run_id, after_tenant="acme", after_device=device_id[:-1], limit=1)
    )
    assert (await twin.describe()).status != WorkflowExecutionStatus.RUNNING
