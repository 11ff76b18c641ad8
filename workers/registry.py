"""What each task queue runs: the orchestration queue runs workflows, the others a service."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from activities.analytics import AnalyticsService
from activities.devices import DeviceService
from activities.notifications import NotificationService
from activities.telemetry import DataService
from fleetflow.contracts.common import TaskQueue
from fleetflow.db import Pool
from fleetflow.settings import Settings
from workflows.bulk_onboarding import BulkOnboarding
from workflows.device_onboarding import DeviceOnboarding
from workflows.system_check import SystemCheck

WORKFLOWS: Sequence[type] = (SystemCheck, DeviceOnboarding, BulkOnboarding)


def activities_for(queue: TaskQueue, pool: Pool, settings: Settings) -> list[Callable[..., Any]]:
    """The activity methods of the service that owns queue."""
    if queue is TaskQueue.DEVICE:
        devices = DeviceService(pool, settings)
        return [
            devices.ping, devices.validate_onboarding, devices.register, devices.mark_failed,
            devices.issue_credential, devices.revoke_credential, devices.store_config,
            devices.remove_config, devices.activate, devices.provision_batch,
            devices.deprovision_batch,
        ]  # fmt: skip
    if queue is TaskQueue.DATA:
        return [DataService(pool).ping]
    if queue is TaskQueue.ANALYTICS:
        return [AnalyticsService(pool).ping]
    if queue is TaskQueue.NOTIFICATION:
        notifications = NotificationService(pool)
        return [notifications.ping, notifications.record_events, notifications.retract_event]
    return []
