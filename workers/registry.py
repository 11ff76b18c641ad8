"""What each task queue runs: the orchestration queue runs workflows, the others a service."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import httpx
from temporalio.client import Client

from activities.analytics import AnalyticsService
from activities.devices import DeviceService
from activities.notifications import NotificationService
from activities.telemetry import DataService
from activities.webhook_delivery import WebhookDeliveryService
from fleetflow.contracts.common import TaskQueue
from fleetflow.db import Pool
from fleetflow.payload_codec import payload_keys
from fleetflow.settings import Settings
from fleetflow.webhook_network import AddressPolicy
from workflows.alert_lifecycle import AlertLifecycle
from workflows.bulk_onboarding import BulkOnboarding
from workflows.credential_rotation import CredentialRotation
from workflows.device_command import DeviceCommand
from workflows.device_decommission import DeviceDecommission
from workflows.device_onboarding import DeviceOnboarding
from workflows.device_twin import DeviceTwin
from workflows.event_delivery import EventDelivery
from workflows.firmware_rollout import FirmwareRollout
from workflows.ingestion_supervisor import IngestionSupervisor
from workflows.reconciliation import Reconciliation
from workflows.retention import Retention
from workflows.system_check import SystemCheck
from workflows.telemetry_ingestion import TelemetryIngestion
from workflows.threshold_alert import ThresholdAlert

WORKFLOWS: Sequence[type] = (
    SystemCheck,
    DeviceOnboarding,
    BulkOnboarding,
    DeviceTwin,
    TelemetryIngestion,
    IngestionSupervisor,
    Reconciliation,
    EventDelivery,
    FirmwareRollout,
    DeviceDecommission,
    AlertLifecycle,
    CredentialRotation,
    DeviceCommand,
    Retention,
    ThresholdAlert,
)


def service_for(
    queue: TaskQueue,
    pool: Pool,
    settings: Settings,
    temporal: Client | None = None,
    http: httpx.AsyncClient | None = None,
) -> object:
    """The service instance that owns queue; the notification service signals its delivery
    workflows through temporal; webhook deliveries go out through http (a vetted client from
    `webhook_client`; one is made when none is given)."""
    if queue is TaskQueue.DEVICE:
        return DeviceService(pool, settings, temporal)
    if queue is TaskQueue.DATA:
        return DataService(pool, temporal)
    if queue is TaskQueue.ANALYTICS:
        return AnalyticsService(pool)
    if queue is TaskQueue.NOTIFICATION:
        return NotificationService(pool, temporal)
    if queue is TaskQueue.WEBHOOK:
        return WebhookDeliveryService(
            pool,
            payload_keys(settings),
            AddressPolicy.from_settings(settings),
            http,
            tenant_slots=settings.webhook_tenant_slots,
            temporal=temporal,
        )
    raise ValueError(f"{queue.value} runs workflows, not a service")


def carried_over(
    queue: TaskQueue,
    pool: Pool,
    settings: Settings,
    http: httpx.AsyncClient | None = None,
    temporal: Client | None = None,
) -> list[Callable[..., Any]]:
    """Activities a queue still runs for workflow runs started by older code: `EventDelivery`
    runs from before the webhook queue schedule `notification.deliver_pending` on the
    notification queue until they continue as new (their recorded commands say so). Like the
    webhook queue's, it nudges the subscribers of the circuit events it records through temporal."""
    if queue is TaskQueue.NOTIFICATION:
        delivery = service_for(TaskQueue.WEBHOOK, pool, settings, temporal, http=http)
        assert isinstance(delivery, WebhookDeliveryService)
        return [delivery.deliver_pending]
    return []


def activities_of(service: object) -> list[Callable[..., Any]]:
    """The bound `@activity.defn` methods of a service instance."""
    return [
        getattr(service, name)
        for name in dir(type(service))
        if hasattr(getattr(type(service), name), "__temporal_activity_definition")
    ]
