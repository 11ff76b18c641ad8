"""Contracts of the device twin: desired and reported state, versions and delta."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from fleetflow.contracts.common import Actor, Contract, TenantId

# well under Temporal's 10,240-event warning; the twin continues as new past it
TWIN_HISTORY_LIMIT = 2000

# Twin document limits (compact UTF-8 JSON), so no history event of the twin nears Temporal's
# limits: an update or signal carries at most one document, continue-as-new the whole state
MAX_DOCUMENT_BYTES = 64 * 1024  # desired, reported, and a patch of either
MAX_TWIN_BYTES = 96 * 1024  # desired + reported
MAX_DOCUMENT_DEPTH = 10  # nesting of objects and arrays; {"a": 1} is 1 deep
MAX_DOCUMENT_KEYS = 1000  # object members of a document, at every level


class TwinState(Contract):
    """Everything the twin knows; carried across continue-as-new."""

    tenant: TenantId
    device_id: str
    desired: dict[str, Any] = Field(default_factory=dict)
    desired_version: int = 0
    reported: dict[str, Any] = Field(default_factory=dict)
    reported_version: int = 0
    last_seen: datetime | None = None
    offline_after_s: int = 300
    ended: bool = False
    end_reason: str | None = None


class TwinInput(Contract):
    """Input of DeviceTwin; `state` is set when it continues as new."""

    tenant: TenantId
    device_id: str
    config_schema: dict[str, Any]
    initial_desired: dict[str, Any] = Field(default_factory=dict)
    initial_reported: dict[str, Any] = Field(default_factory=dict)
    offline_after_s: Annotated[int, Field(ge=1, le=30 * 86400)] = 300
    history_limit: Annotated[int, Field(ge=50, le=9000)] = TWIN_HISTORY_LIMIT
    state: TwinState | None = None


class SetDesired(Contract):
    """Argument of the `set_desired` update: a JSON merge patch of the desired document."""

    actor: Actor
    patch: dict[str, Any]
    expected_version: int | None = None


class DesiredSet(Contract):
    """Result of `set_desired`."""

    version: int
    delta: dict[str, Any]


class ReportState(Contract):
    """Signal `report`: a JSON merge patch of the reported document, from the device."""

    patch: dict[str, Any]
    at: datetime


class EndTwin(Contract):
    """Signal `end`: the device is retired; the twin completes."""

    reason: str
    actor: str


class TwinView(Contract):
    """A twin as the API shows it (now, or as of a past point)."""

    device_id: str
    desired: dict[str, Any]
    desired_version: int
    reported: dict[str, Any]
    reported_version: int
    delta: dict[str, Any]
    last_seen: datetime | None
    connection: Literal["online", "offline", "never_seen"]
    ended: bool
    as_of: datetime | None = None
    run_id: str | None = None


class DeltaView(Contract):
    """Answer of `GET /v1/device/twin/delta`."""

    delta: dict[str, Any]
    desired_version: int


class WaitForDelta(Contract):
    """Argument of the `wait_for_delta` update: the device's long-poll, held by the twin itself."""

    tenant: TenantId
    device_id: str
    timeout_s: Annotated[float, Field(gt=0, le=120)]
    # names this wait, so the `release_wait` signal of a device that hung up ends it (and no other)
    waiter_id: str = ""
