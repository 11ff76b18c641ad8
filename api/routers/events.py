"""The event bus: domain events, webhook subscriptions and dead letters."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from activities.notifications import NotificationService
from activities.subscriptions import NotDeadLettered, Subscriptions
from api.auth import State, require
from api.models.base import as_contract
from api.models.events import DeliveryPage, EventPage, SecretRotationBody, SubscriptionBody
from api.problems import conflict, invalid, not_found
from fleetflow.contracts.events import DeliveryView, SecretRotation, SubscriptionRequest, SubscriptionView
from fleetflow.contracts.limits import DEVICE_ID_MAX_CHARS, EventTypeName
from fleetflow.payload_codec import payload_keys
from fleetflow.security import TokenClaims
from fleetflow.webhook_network import AddressPolicy, RefusedAddress

router = APIRouter(tags=["events"])
Reader = Annotated[TokenClaims, Depends(require("events:read"))]
Manager = Annotated[TokenClaims, Depends(require("subscriptions:write"))]
Limit = Annotated[int, Query(ge=1, le=1000)]
After = Annotated[int | None, Query(ge=0, description="the last seq (or id) of the previous page")]


def _service(state: State) -> NotificationService:
    # the event store's read side: the process's pool
    return NotificationService(state.pool, state.temporal)


def _subscriptions(state: State) -> Subscriptions:
    # a thin view over the process's pool and Temporal client, with its keys and webhook policy
    return Subscriptions(
        state.pool,
        state.temporal,
        keys=payload_keys(state.settings),
        policy=AddressPolicy.from_settings(state.settings),
    )


Service = Annotated[NotificationService, Depends(_service)]
Subs = Annotated[Subscriptions, Depends(_subscriptions)]


@router.get("/v1/events", response_model=EventPage)
async def list_events(
    service: Service,
    claims: Reader,
    device_id: Annotated[str | None, Query(max_length=DEVICE_ID_MAX_CHARS)] = None,
    event_type: Annotated[EventTypeName | None, Query(alias="type")] = None,
    since: Annotated[datetime | None, Query(description="occurred at or after (RFC 3339)")] = None,
    after: After = None,
    limit: Limit = 100,
) -> EventPage:
    """The tenant's domain events in recorded order."""
    items = await service.list_events(
        claims.tenant, device_id=device_id, event_type=event_type, since=since, after=after, limit=limit
    )
    return EventPage(items=items, next_after=items[-1].seq if len(items) == limit else None)


@router.post("/v1/subscriptions", status_code=status.HTTP_201_CREATED, response_model=SubscriptionView)
async def create_subscription(
    body: SubscriptionBody, service: Subs, claims: Manager, state: State
) -> SubscriptionView:
    """Subscribe a webhook to event types (or `["*"]`); it receives events recorded from now on.
    A URL whose host is (or resolves to) a loopback, private, link-local, multicast or
    unspecified address is refused (422) unless the operator allows its network; 403 at the
    tenant's subscription quota (`max_subscriptions`)."""
    async with state.quotas.count_lock(claims.tenant, "max_subscriptions"):
        await state.quotas.check_count(claims.tenant, "max_subscriptions")
        try:
            request = as_contract(body, SubscriptionRequest)
            return await service.create_subscription(claims.tenant, claims.subject, request)
        except RefusedAddress as exc:
            raise invalid(["body", "url"], str(exc)) from None


@router.get("/v1/subscriptions", response_model=list[SubscriptionView])
async def list_subscriptions(service: Subs, claims: Manager) -> list[SubscriptionView]:
    """The tenant's subscriptions with their pending and dead-lettered counts (never the secret)."""
    return await service.list_subscriptions(claims.tenant)


@router.get("/v1/subscriptions/{subscription_id}", response_model=SubscriptionView)
async def get_subscription(subscription_id: str, service: Subs, claims: Manager) -> SubscriptionView:
    """One subscription of the tenant."""
    found = await service.list_subscriptions(claims.tenant, subscription_id)
    if not found:
        raise not_found(f"subscription {subscription_id!r}")
    return found[0]


@router.post("/v1/subscriptions/{subscription_id}/rotate-secret", response_model=SubscriptionView)
async def rotate_secret(
    subscription_id: str, body: SecretRotationBody, service: Subs, claims: Manager
) -> SubscriptionView:
    """Replace the signing secret; the replaced one still signs beside it for `overlap_s`, so
    receivers can switch without losing a delivery."""
    rotated = await service.rotate_secret(claims.tenant, subscription_id, as_contract(body, SecretRotation))
    if rotated is None:
        raise not_found(f"subscription {subscription_id!r}")
    return rotated


@router.delete("/v1/subscriptions/{subscription_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_subscription(subscription_id: str, service: Subs, claims: Manager) -> Response:
    """Stop delivering: the subscription, its pending deliveries and dead letters are removed."""
    if not await service.delete_subscription(claims.tenant, subscription_id):
        raise not_found(f"subscription {subscription_id!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/v1/dead-letters", response_model=DeliveryPage)
async def dead_letters(
    service: Subs,
    claims: Reader,
    subscription_id: Annotated[str | None, Query(max_length=64)] = None,
    after: After = None,
    limit: Limit = 100,
) -> DeliveryPage:
    """Events that exhausted their subscription's attempts, with the last error."""
    items = await service.dead_letters(
        claims.tenant, subscription_id=subscription_id, after=after, limit=limit
    )
    return DeliveryPage(items=items, next_after=items[-1].delivery_id if len(items) == limit else None)


@router.post(
    "/v1/dead-letters/{delivery_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeliveryView,
)
async def redeliver(delivery_id: int, service: Subs, claims: Manager) -> DeliveryView:
    """Queue a dead letter again, in its seq place, with a fresh attempt budget."""
    try:
        delivery = await service.redeliver(claims.tenant, delivery_id)
    except NotDeadLettered as exc:
        raise conflict(str(exc)) from None
    if delivery is None:
        raise not_found(f"dead letter {delivery_id}")
    return delivery
