"""Contracts of the notification service's event store."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from fleetflow.contracts.common import DomainEvent, Strict

DEVICE_ONBOARDED = "DeviceOnboarded"
DEVICE_ONBOARDING_FAILED = "DeviceOnboardingFailed"


class EventBatch(Strict):
    """Input of `notification.record_events`."""

    events: Annotated[list[DomainEvent], Field(max_length=5000)]


class RetractEvent(Strict):
    """Input of `notification.retract_event` (saga compensation of a recorded event)."""

    event_id: str
