"""ThresholdAlert: raise one device's alert for a threshold rule as soon as a reading crossing it
is accepted (id `alert-raise-{tenant}-{device_id}/{rule_id}`), instead of after the reading's
window is stored, which waits behind its shard's backlog.

The API starts it, before it answers 202, for a batch whose readings cross a threshold rule of
the tenant while no alert of that device and rule holds. The analytics service raises the alert
(once: its window-keyed events make a retry harmless, and the one-active-alert index makes the
window that stores the reading raise nothing again), then the notification service records the
`AlertRaised` event, as for a window. A rule's `rate` and `zscore` kinds need the series' state,
so they are evaluated on the windows only; clearing stays with the windows too.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import tenant_scoped_id
    from fleetflow.contracts.telemetry import EarlyRaise, WindowRef
    from fleetflow.interfaces.analytics import AnalyticsActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from workflows import calls

STEP_TIMEOUT = timedelta(seconds=30)
# an alert is wanted now: retried soon, and for ever (the window would raise it too, later)
RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=10))


def threshold_alert_id(tenant: str, device_id: str, rule_id: str) -> str:
    """The business id of raising one device's alert for one rule of its tenant: one at a time."""
    return tenant_scoped_id("alert-raise", tenant, f"{device_id}/{rule_id}")


@workflow.defn
class ThresholdAlert:
    """Raises one alert and records its event."""

    @workflow.run
    async def run(self, inp: EarlyRaise) -> int:
        """Raise the alert if the rule still does; how many events were recorded (0 or 1)."""
        info = workflow.info()
        window_id = f"{info.workflow_id}/{info.run_id}"
        raised = await calls.execute(
            AnalyticsActivities.raise_early,
            inp.model_copy(update={"window_id": window_id}),
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        if not raised:
            return 0
        return await calls.execute(
            NotificationActivities.record_window_events,
            WindowRef(window_id=window_id),
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
