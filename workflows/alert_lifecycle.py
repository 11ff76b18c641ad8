"""AlertLifecycle: acknowledge or clear one alert by hand (id `alert-{tenant}-{alert_id}-{action}`).

The analytics service changes the alert (once: a retry is harmless), then the notification
service records its `AlertAcknowledged` / `AlertCleared` event, so the change and its event
both happen even when the API that asked is gone. An alert is acknowledged at most once and
cleared at most once, which makes the action a business id.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import tenant_scoped_id
    from fleetflow.contracts.events import EventBatch
    from fleetflow.contracts.telemetry import AlertActed, AlertAction
    from fleetflow.interfaces.analytics import AnalyticsActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from workflows import calls
    from workflows.saga import COMPENSATION_RETRY


def alert_action_id(tenant: str, alert_id: int, action: str) -> str:
    """The business id of an action on one tenant's alert."""
    return tenant_scoped_id("alert", tenant, f"{alert_id}-{action}")


@workflow.defn
class AlertLifecycle:
    """Changes one alert by hand and records the event."""

    @workflow.run
    async def run(self, inp: AlertAction) -> AlertActed:
        """Act on the alert; record the event when it changed."""
        info = workflow.info()
        request = inp.model_copy(update={"action_id": f"{info.workflow_id}/{info.run_id}"})
        acted = await calls.execute(
            AnalyticsActivities.act_on_alert,
            request,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=COMPENSATION_RETRY,
        )
        if acted.event is not None:
            event = acted.event.model_copy(update={"source_workflow": info.workflow_id})
            await calls.execute(
                NotificationActivities.record_events,
                EventBatch(events=[event]),
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=COMPENSATION_RETRY,
            )
        return acted
