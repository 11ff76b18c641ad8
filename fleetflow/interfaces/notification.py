"""The notification service: the event store and webhook subscriptions; owns the `notification` schema.

Declarations only (see `fleetflow.interfaces`): safe to import in the workflow sandbox.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from temporalio import activity

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.consistency import ConsistencyEvents
from fleetflow.contracts.events import BulkOnboardedEvents, EventBatch, RetractEvent, RetractEvents
from fleetflow.contracts.retention import NotificationRetained, RetentionRequest
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import WindowRef
from fleetflow.interfaces.base import ServiceInterface


class NotificationActivities(ServiceInterface):
    """Activities of the `notification` task queue."""

    service: ClassVar[str] = "notification"
    queue: ClassVar[TaskQueue] = TaskQueue.NOTIFICATION

    @activity.defn(name="notification.ping")
    @abstractmethod
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""

    @activity.defn(name="notification.record_events")
    @abstractmethod
    async def record_events(self, batch: EventBatch) -> int:
        """Record events once each (keyed by tenant and event id) and enqueue their deliveries;
        returns how many were new. A retry after the commit finds every event there and enqueues
        nothing more. An event whose id its tenant already holds for a *different* event is not
        dropped: it is recorded as `<event_id>#<digest>` (and logged).
        """

    @activity.defn(name="notification.record_window_events")
    @abstractmethod
    async def record_window_events(self, ref: WindowRef) -> int:
        """Record a telemetry window's events, read from the tables of the services that made
        them (TelemetryStored per tenant from data.windows, BatchQuarantined from the batches
        set aside, alerts from analytics.window_events), a thousand at a time; how many were new.
        Idempotent: each event id names the window and the tenant.
        """

    @activity.defn(name="notification.record_bulk_onboarded")
    @abstractmethod
    async def record_bulk_onboarded(self, ref: BulkOnboardedEvents) -> int:
        """Record `DeviceOnboarded` for the devices of one bulk slice its attempt activated, read
        from the claim and the device facade (one statement each); how many were new.
        Idempotent: each event id names the attempt and the device.
        """

    @activity.defn(name="notification.record_consistency_events")
    @abstractmethod
    async def record_consistency_events(self, page: ConsistencyEvents) -> int:
        """Record a ConsistencyRepaired or ConsistencyFinding event for each finding of one
        checked page of the registry (read through the device facade); how many were new.
        Idempotent: each event id names the run, tenant, device and finding type.
        """

    @activity.defn(name="notification.retract_event")
    @abstractmethod
    async def retract_event(self, request: RetractEvent) -> None:
        """Compensation of recording an event whose operation was undone (its deliveries go too).
        Only within a tenant: the request's, else the verified caller's (a platform actor, who
        has none, may retract any).
        """

    @activity.defn(name="notification.retract_events")
    @abstractmethod
    async def retract_events(self, request: RetractEvents) -> int:
        """Compensation of the events one undone attempt recorded (a bulk import's, thousands):
        one statement, by their common id prefix.
        """

    @activity.defn(name="notification.apply_retention")
    @abstractmethod
    async def apply_retention(self, request: RetentionRequest) -> NotificationRetained:
        """Delete events past their age whose deliveries are all done (their deliveries go with
        them) and dead letters past theirs. Idempotent.
        """
