"""Reconciliation (id `reconcile-<key>`; a Schedule's runs get `<schedule id>-<time>`): compares
the registry, twins, credentials and rollout jobs, page by page, and the ingestion claims;
repairs what is safe and records the rest (GET /v1/consistency).

Each page of the registry (keyset by tenant, device id) is one `device.reconcile_devices`
activity; the history carries the last key and counts only, and the run continues as new
(cursor in the input) after `pages_per_run` pages or when the server suggests it, so a
fleet of a million devices is a few hundred activities in a handful of runs. Claims of dead
ingestion runs go back to pending through the IngestionSupervisor's own activity. A page with
findings has them recorded as events (ConsistencyRepaired, ConsistencyFinding) by the
notification service, which reads them from the device facade.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.consistency import (
        ConsistencyEvents,
        FinishReconciliation,
        ReconcileInput,
        ReconcilePage,
        ReconcileResult,
    )
    from fleetflow.contracts.telemetry import SuperviseIngestion
    from fleetflow.interfaces.data import DataActivities
    from fleetflow.interfaces.device import DeviceActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from workflows import calls

PAGE_TIMEOUT = timedelta(minutes=5)
RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=60))


def reconcile_id(key: str) -> str:
    """The business id of a run started by hand (key: the time, or the caller's)."""
    return f"reconcile-{key}"


@workflow.defn
class Reconciliation:
    """One pass over the fleet; query `progress`."""

    def __init__(self) -> None:
        self._checked = 0

    @workflow.run
    async def run(self, inp: ReconcileInput) -> ReconcileResult:
        """Check the registry page by page, then the ingestion claims; record the totals."""
        run_id = workflow.info().workflow_id
        started_at = inp.started_at or workflow.now()
        after_tenant, after_device, self._checked = inp.after_tenant, inp.after_device, inp.checked
        pages = 0
        while True:
            page = await calls.execute(
                DeviceActivities.reconcile_devices,
                ReconcilePage(
                    run_id=run_id, after_tenant=after_tenant, after_device=after_device, limit=inp.page_size
                ),
                start_to_close_timeout=PAGE_TIMEOUT,
                retry_policy=RETRY,
            )
            self._checked += page.checked
            if page.findings and page.last_tenant is not None and page.last_device is not None:
                await calls.execute(
                    NotificationActivities.record_consistency_events,
                    ConsistencyEvents(
                        run_id=run_id,
                        after_tenant=after_tenant,
                        after_device=after_device,
                        last_tenant=page.last_tenant,
                        last_device=page.last_device,
                    ),
                    start_to_close_timeout=PAGE_TIMEOUT,
                    retry_policy=RETRY,
                )
            if page.last_tenant is None or page.last_device is None or page.checked < inp.page_size:
                break  # the registry is done
            after_tenant, after_device, pages = page.last_tenant, page.last_device, pages + 1
            if pages >= inp.pages_per_run or workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(
                    inp.model_copy(
                        update={
                            "after_tenant": after_tenant,
                            "after_device": after_device,
                            "checked": self._checked,
                            "started_at": started_at,
                        }
                    )
                )
        supervised = await calls.execute(
            DataActivities.supervise_ingestion,
            SuperviseIngestion(shards=inp.shards),
            start_to_close_timeout=PAGE_TIMEOUT,
            retry_policy=RETRY,
        )
        await calls.execute(
            DeviceActivities.finish_reconciliation,
            FinishReconciliation(
                run_id=run_id, started_at=started_at, checked=self._checked, reclaimed=supervised.reclaimed
            ),
            start_to_close_timeout=PAGE_TIMEOUT,
            retry_policy=RETRY,
        )
        return ReconcileResult(run_id=run_id, checked=self._checked, reclaimed=supervised.reclaimed)

    @workflow.query
    def progress(self) -> int:
        """Devices checked so far (this run and the runs it continued)."""
        return self._checked
