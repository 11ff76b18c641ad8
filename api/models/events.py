"""Bodies and pages of `/v1/events`, `/v1/subscriptions` and `/v1/dead-letters`."""

from __future__ import annotations

from api.models.base import STRICT, View
from fleetflow.contracts.events import DeliveryView, RecordedEvent, SecretRotation, SubscriptionRequest


class SubscriptionBody(SubscriptionRequest):
    """Body of `POST /v1/subscriptions`."""

    model_config = STRICT


class SecretRotationBody(SecretRotation):
    """Body of `POST /v1/subscriptions/{id}/rotate-secret`."""

    model_config = STRICT


class EventPage(View):
    """`GET /v1/events`: pass `next_after` back as `after` for the next page."""

    items: list[RecordedEvent]
    next_after: int | None = None


class DeliveryPage(View):
    """`GET /v1/dead-letters`: pass `next_after` back as `after` for the next page."""

    items: list[DeliveryView]
    next_after: int | None = None
