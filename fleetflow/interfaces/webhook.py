"""Webhook delivery: POSTs pending deliveries to subscribers (the `webhook` task queue).

Declarations only (see `fleetflow.interfaces`): safe to import in the workflow sandbox.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from temporalio import activity

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.events import DeliverPending, DeliveryProgress
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.interfaces.base import ServiceInterface


class WebhookActivities(ServiceInterface):
    """Activities of the `webhook` task queue."""

    service: ClassVar[str] = "webhook"
    queue: ClassVar[TaskQueue] = TaskQueue.WEBHOOK

    @activity.defn(name="webhook.ping")
    @abstractmethod
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""

    @activity.defn(name="notification.deliver_pending")
    @abstractmethod
    async def deliver_pending(self, request: DeliverPending) -> DeliveryProgress:
        """POST the subscription's pending deliveries in seq order, marking each once delivered.

        A failed POST counts against that delivery's attempts. Below the subscription's
        limit, the activity fails when it has delivered nothing yet (Temporal retries it
        with backoff) or returns when it has (its progress counted; the next call starts
        with fresh backoff). At the limit the delivery becomes a dead letter and the
        activity returns, so the queue moves on. At least once: a crash between a POST
        and its mark sends that event again.
        """
