"""The analytics service: rules over stored windows, alerts; owns the `analytics` schema.

Declarations only (see `fleetflow.interfaces`): safe to import in the workflow sandbox.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from temporalio import activity

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import AlertActed, AlertAction, EarlyRaise, Evaluated, WindowRef
from fleetflow.interfaces.base import ServiceInterface


class AnalyticsActivities(ServiceInterface):
    """Activities of the `analytics` task queue."""

    service: ClassVar[str] = "analytics"
    queue: ClassVar[TaskQueue] = TaskQueue.ANALYTICS

    @activity.defn(name="analytics.ping")
    @abstractmethod
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""

    @activity.defn(name="analytics.evaluate")
    @abstractmethod
    async def evaluate(self, ref: WindowRef) -> Evaluated:
        """Run the tenants' rules over a stored window; raise and clear alerts once each. The
        window's events go to analytics.window_events (the notification service records them).

        From the last-resort attempt on, a series whose rules fail (a value or time the rules
        cannot compute with) is skipped with an `AnalysisFailed` event instead of failing the
        whole window again.
        """

    @activity.defn(name="analytics.act_on_alert")
    @abstractmethod
    async def act_on_alert(self, request: AlertAction) -> AlertActed:
        """Acknowledge or clear one of the tenant's alerts by hand; the event to record with it.
        Done once: a retry of the same action answers the same, another action on an alert
        already acknowledged (or cleared) is a conflict."""

    @activity.defn(name="analytics.raise_early")
    @abstractmethod
    async def raise_early(self, request: EarlyRaise) -> int:
        """Raise the alert of one device and threshold rule for a reading that crossed it when
        its batch was accepted, unless the device or rule no longer allows it or an alert of
        theirs still holds; its event goes to analytics.window_events under the request's
        window_id (the notification service records it). How many events: 0 or 1. Done once."""
