"""Time travel with the closed-run history cache: the same states as a rebuild from freshly
fetched histories, across continue-as-new runs, and per tenant when two tenants share device ids."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from api.time_travel import ClosedRunHistories, NoTwinThen, twin_as_of
from fleetflow.contracts.common import Actor
from fleetflow.contracts.twin import ReportState, SetDesired, TwinInput
from fleetflow.identity import acting_for
from fleetflow.security import ServiceActor
from fleetflow.temporal import device_search_attributes
from workflows.device_twin import DeviceTwin, twin_id

TENANTS = ("acme", "initech")


async def _busy_twin(client: Client, tenant: str, device_id: str, base: int) -> dict[int, datetime]:
    """A twin (history limit 50, so it continues as new every ~10 changes) given 24 desired
    changes `base + i` and a report after each; the time after each change, by version."""
    handle = await client.start_workflow(
        DeviceTwin.run,
        TwinInput(tenant=tenant, device_id=device_id, config_schema={}, history_limit=50),
        id=twin_id(tenant, device_id),
        task_queue="orchestration",
        search_attributes=device_search_attributes(tenant, "twin", device_id),
    )
    actor = Actor(subject="tester", tenant=tenant, scopes=["devices:write"])
    marks: dict[int, datetime] = {}
    for i in range(1, 25):
        with acting_for(ServiceActor(subject="tester", tenant=tenant, scopes=["devices:write"])):
            done = await handle.execute_update(
                DeviceTwin.set_desired, SetDesired(actor=actor, patch={"n": base + i})
            )
        marks[done.version] = datetime.now(UTC)
        await handle.signal(DeviceTwin.report, ReportState(patch={"n": base + i}, at=datetime.now(UTC)))
    return marks


async def test_cached_rebuilds_equal_fresh_ones_across_runs_and_tenants(
    client: Client, workers: None
) -> None:
    device_id = f"cache-{uuid.uuid4().hex[:8]}"  # the same device id in both tenants
    marks = {
        t: await _busy_twin(client, t, device_id, base) for t, base in zip(TENANTS, (0, 1000), strict=True)
    }
    cache = ClosedRunHistories()
    for tenant, base in zip(TENANTS, (0, 1000), strict=True):
        wid = twin_id(tenant, device_id)
        runs = [r async for r in client.list_workflows(f"WorkflowId = '{wid}'")]
        assert len(runs) >= 3, "the twin continued as new at least twice"
        for run in runs:
            events = (await client.get_workflow_handle(wid, run_id=run.run_id).fetch_history()).events
            closed = events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
            for event_id in sorted({1, 4, 9, 17, 26, 33, 41, len(events)} & set(range(1, len(events) + 1))):
                # every rebuild twice from the cache (the first fills it), once from a fresh fetch
                cached = [
                    await twin_as_of(
                        client, tenant, wid, run_id=run.run_id, event_id=event_id, histories=cache
                    )
                    for _ in range(2)
                ]
                fresh = await twin_as_of(
                    client, tenant, wid, run_id=run.run_id, event_id=event_id, histories=ClosedRunHistories(0)
                )
                assert cached[0] == cached[1] == fresh, (tenant, run.run_id, event_id)
            assert closed == (cache.get((client.namespace, tenant, wid, run.run_id)) is not None)
        # by time, across the runs: each tenant sees its own changes
        for version in (1, 9, 17, 24):
            state, _, _ = await twin_as_of(client, tenant, wid, at=marks[tenant][version], histories=cache)
            assert state.desired == {"n": base + version} and state.tenant == tenant
    # another tenant's twin stays refused with the cache holding its runs
    acme_runs = [r async for r in client.list_workflows(f"WorkflowId = '{twin_id('acme', device_id)}'")]
    for run in acme_runs:
        with pytest.raises(NoTwinThen):
            await twin_as_of(
                client, "initech", twin_id("acme", device_id), run_id=run.run_id, event_id=5, histories=cache
            )
