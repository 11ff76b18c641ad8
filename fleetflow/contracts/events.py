"""Contracts of the notification service: the event store and the event bus (webhooks)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    HttpUrl,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from fleetflow.contracts.common import Contract, DomainEvent, TenantId
from fleetflow.contracts.limits import EventTypeName as EventTypeName
from fleetflow.webhook_signing import secret_key

DEVICE_ONBOARDED = "DeviceOnboarded"
DEVICE_ONBOARDING_FAILED = "DeviceOnboardingFailed"

EVENT_DELIVERY_WORKFLOW = "EventDelivery"
ALL_EVENTS = "*"
# well under Temporal's 10,240-event warning; the delivery loop continues as new past it
DELIVERY_HISTORY_LIMIT = 2000

# the shortest retry interval of a failing webhook: below it, one dead receiver keeps a worker busy
MIN_BACKOFF_S = 1.0
# how long a replaced secret still signs deliveries, by default and at most
SECRET_OVERLAP_S, MAX_SECRET_OVERLAP_S = 86400, 7 * 86400

# a subscription's circuit breaker (activities/circuit_breaker.py): its events, and defaults
CIRCUIT_OPENED = "SubscriptionCircuitOpened"
CIRCUIT_CLOSED = "SubscriptionCircuitClosed"
CIRCUIT_THRESHOLD, CIRCUIT_PROBE_S, CIRCUIT_MAX_PROBE_S = 5, 30.0, 3600.0


def delivery_workflow_id(tenant: str, subscription_id: str) -> str:
    """The business id of a subscription's delivery workflow."""
    return f"deliveries-{tenant}-{subscription_id}"


class EventBatch(Contract):
    """Input of `notification.record_events`."""

    events: Annotated[list[DomainEvent], Field(max_length=5000)]


class RetractEvent(Contract):
    """Input of `notification.retract_event` (saga compensation of a recorded event); with the
    tenant, only that tenant's event of this id is retracted."""

    event_id: str
    # the event's tenant; when absent, the verified actor's tenant scopes the retraction
    tenant: TenantId | None = None


class RetractEvents(Contract):
    """Input of `notification.retract_events`: the events of one type of a tenant whose ids
    start with id_prefix (one undone attempt's), only those of device_ids when given."""

    tenant: TenantId
    type: str
    id_prefix: Annotated[str, Field(min_length=1)]
    device_ids: list[str] | None = None


class BulkOnboardedEvents(Contract):
    """Input of `notification.record_bulk_onboarded`: a `DeviceOnboarded` event for each device
    of rows [offset, offset+limit) of a bulk import's claim that the attempt `owner` activated.
    Ids only: the devices are read from the device service, not carried in the history."""

    tenant: TenantId
    claim_id: str
    offset: Annotated[int, Field(ge=0)]
    limit: Annotated[int, Field(ge=0, le=10_000)]
    owner: str  # the onboarding id of the devices (the bulk attempt)
    event_key: str  # each event id is `<event_key>/<device id>/DeviceOnboarded`
    bulk_id: str
    actor: str
    source_workflow: str
    occurred_at: datetime


class RecordedEvent(DomainEvent):
    """An event as stored: `seq` is its place in the tenant's recorded order."""

    seq: int


# --- subscriptions -------------------------------------------------------------


def _key_of(secret: str) -> str:
    secret_key(secret)  # a whsec_ secret must decode
    return secret


WebhookSecret = Annotated[str, Field(min_length=16, max_length=256), AfterValidator(_key_of)]


class SubscriptionRequest(Contract):
    """Body of `POST /v1/subscriptions`; the retry fields bound how long a failing
    webhook holds its queue before an event is dead-lettered."""

    url: HttpUrl
    event_types: Annotated[list[EventTypeName], Field(min_length=1, max_length=100)]
    secret: WebhookSecret
    max_attempts: Annotated[int, Field(ge=1, le=25)] = 5
    backoff_s: Annotated[float, Field(ge=MIN_BACKOFF_S, le=600)] = 2.0
    max_backoff_s: Annotated[float, Field(ge=MIN_BACKOFF_S, le=3600)] = 300.0
    # consecutive receiver failures that open the circuit; the first probe's delay, doubled
    # per failed probe up to the cap
    circuit_threshold: Annotated[int, Field(ge=1, le=100)] = CIRCUIT_THRESHOLD
    circuit_probe_s: Annotated[float, Field(ge=MIN_BACKOFF_S, le=3600)] = CIRCUIT_PROBE_S
    circuit_max_probe_s: Annotated[float, Field(ge=MIN_BACKOFF_S, le=86400)] = CIRCUIT_MAX_PROBE_S

    @field_validator("event_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        if ALL_EVENTS in value and len(value) > 1:
            raise ValueError(f"{ALL_EVENTS!r} means every event type and stands alone")
        return sorted(set(value))

    @field_validator("max_backoff_s", "circuit_max_probe_s")
    @classmethod
    def _cap(cls, value: float, info: ValidationInfo) -> float:
        floor = {"max_backoff_s": "backoff_s", "circuit_max_probe_s": "circuit_probe_s"}[str(info.field_name)]
        if value < info.data.get(floor, 0):
            raise ValueError(f"must be at least {floor}")
        return value


class CircuitState(StrEnum):
    """`closed`: delivering; `open`: paused until `next_probe_at`; `half_open`: the next
    delivery is the probe (it is due, or being posted)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitView(Contract):
    """A subscription's circuit breaker as the API shows it."""

    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    opened_at: datetime | None = None
    next_probe_at: datetime | None = None
    # why the receiver last failed (never what it answered)
    last_error: str | None = None


class SubscriptionView(Contract):
    """A subscription as the API shows it (never its secret)."""

    subscription_id: str
    tenant: TenantId
    url: str
    event_types: list[str]
    max_attempts: int
    backoff_s: float
    max_backoff_s: float
    created_at: datetime
    created_by: str
    workflow_id: str
    pending: int = 0
    dead_letters: int = 0
    # until then, deliveries are signed with the replaced secret too (after a rotation)
    rotation_overlap_until: datetime | None = None
    circuit_threshold: int = CIRCUIT_THRESHOLD
    circuit_probe_s: float = CIRCUIT_PROBE_S
    circuit_max_probe_s: float = CIRCUIT_MAX_PROBE_S
    circuit: CircuitView = Field(default_factory=CircuitView)


class SecretRotation(Contract):
    """Body of `POST /v1/subscriptions/{id}/rotate-secret`: deliveries are signed with both the
    new and the replaced secret for `overlap_s`, then with the new one only."""

    secret: WebhookSecret
    overlap_s: Annotated[int, Field(ge=0, le=MAX_SECRET_OVERLAP_S)] = SECRET_OVERLAP_S


class DeliveryView(Contract):
    """One event for one subscription: `pending`, `delivered` or `dead` (a dead letter)."""

    delivery_id: int
    subscription_id: str
    status: str
    attempts: int
    last_error: str | None
    updated_at: datetime
    event: RecordedEvent


# --- the delivery workflow and its activity -----------------------------------


class DeliveryInput(Contract):
    """Input of the `EventDelivery` workflow; the counters carry across continue-as-new."""

    tenant: TenantId
    subscription_id: str
    backoff_s: float = 2.0
    max_backoff_s: float = 300.0
    idle_poll_s: Annotated[float, Field(ge=1, le=3600)] = 30.0
    history_limit: Annotated[int, Field(ge=50, le=9000)] = DELIVERY_HISTORY_LIMIT
    delivered: int = 0
    dead_lettered: int = 0


class DeliverPending(Contract):
    """Input of `notification.deliver_pending`."""

    subscription_id: str
    batch_limit: Annotated[int, Field(ge=1, le=1000)] = 100


class DeliveryProgress(Contract):
    """Result of `notification.deliver_pending`."""

    delivered: int = 0
    dead_lettered: int = 0
    more: bool = False  # stopped early: call again at once
    gone: bool = False  # the subscription was deleted: the workflow ends
    # the subscription's circuit is open: nothing is posted before this many seconds
    probe_in_s: float = 0.0

    @model_serializer(mode="wrap")
    def _as_before_circuits(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a closed circuit's progress is what workers from before circuits decode (they forbid
        # unknown fields): the field travels only when the circuit is open
        data: dict[str, Any] = handler(self)
        if not self.probe_in_s:
            data.pop("probe_in_s", None)
        return data


class DeliverySummary(Contract):
    """Result of `EventDelivery` once its subscription is deleted."""

    subscription_id: str
    delivered: int
    dead_lettered: int
