"""Contracts shared by every service: identifiers, task queues, actors and domain events."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleetflow.contracts.limits import DEVICE_ID_PATTERN as DEVICE_ID_PATTERN
from fleetflow.contracts.limits import TENANT_PATTERN as TENANT_PATTERN
from fleetflow.contracts.limits import DeviceId as DeviceId
from fleetflow.contracts.limits import TenantId as TenantId


def is_device_id(value: str) -> bool:
    """True when value is a well-formed device id."""
    return re.fullmatch(DEVICE_ID_PATTERN, value) is not None


def tenant_scoped_id(kind: str, tenant: str, key: str) -> str:
    """The business id `<kind>-<tenant>-<key>` of one tenant's workflow, never another tenant's.

    Tenants may contain '-', so `acme` + `eu-1` and `acme-eu` + `1` would both be
    `<kind>-acme-eu-1`. Such a tenant (or a key with '~') is closed by '~', which no tenant
    contains: `<kind>-acme-eu~1`. A '~' in the id means the tenant ends at the first '~',
    else at the first '-', so no two (tenant, key) pairs share an id, and the ids of
    tenants without '-' are the ones they always had.
    """
    if re.fullmatch(TENANT_PATTERN, tenant) is None:
        raise ValueError(f"{tenant!r} is not a tenant id")
    separator = "~" if "-" in tenant or "~" in key else "-"
    return f"{kind}-{tenant}{separator}{key}"


class TaskQueue(StrEnum):
    """Every task queue; a service is its queue, its worker processes and its schema."""

    ORCHESTRATION = "orchestration"
    DEVICE = "device"
    DATA = "data"
    ANALYTICS = "analytics"
    NOTIFICATION = "notification"
    # the notification service's webhook deliveries: slow receivers wait here, never in front
    # of `notification.record_events`
    WEBHOOK = "webhook"


SERVICE_QUEUES: tuple[TaskQueue, ...] = (
    TaskQueue.DEVICE,
    TaskQueue.DATA,
    TaskQueue.ANALYTICS,
    TaskQueue.NOTIFICATION,
    TaskQueue.WEBHOOK,
)


class Contract(BaseModel):
    """Base of every contract: what travels through Temporal (workflow and activity inputs and
    results, signals, updates, queries, events) and what a service hands out.

    An unknown field is ignored, not an error: during a rolling upgrade an old worker decodes
    payloads that a newer API or worker wrote with a field it does not know yet (and a history
    recorded by a newer release replays on an older one). Strictness belongs at the edge
    (Strict): the API's bodies (`api/models/`) refuse unknown fields with a 422.
    """

    model_config = ConfigDict(extra="ignore")


class Strict(BaseModel):
    """A model of what an edge accepts: an unknown field is an error, not silently dropped (the
    API's bodies, `api/models/`). Never a Temporal payload's base: that is Contract."""

    model_config = ConfigDict(extra="forbid")


class Actor(Contract):
    """Who asked for an operation; travels into workflows for audit and checks."""

    subject: str
    tenant: TenantId
    scopes: list[str] = Field(default_factory=list)

    def can(self, scope: str) -> bool:
        """True when the actor holds scope (or admin)."""
        return scope in self.scopes or "admin" in self.scopes


class DomainEvent(Contract):
    """A fact the platform records durably and delivers to subscribers."""

    event_id: str
    tenant: TenantId
    device_id: str | None = None
    type: str
    occurred_at: datetime
    actor: str
    source_workflow: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
