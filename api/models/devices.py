"""Bodies and answers of `/v1/devices` and `/v1/device-types`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field

from api.models.base import STRICT, Body, View
from fleetflow.contracts.devices import DeviceSpec, DeviceTypeView, DeviceView, OnboardDeviceRequest
from fleetflow.contracts.limits import (
    MAX_BULK_DECOMMISSION,
    MAX_BULK_DEVICES,
    MAX_CREDENTIAL_OVERLAP_S,
    MAX_TAGS,
    DeviceId,
    DeviceTypeName,
    Tag,
)


class DeviceSpecBody(DeviceSpec):
    """A device as an operator describes it (an item of a bulk onboarding)."""

    model_config = STRICT


class OnboardDeviceBody(OnboardDeviceRequest):
    """Body of `POST /v1/devices`; the run gets it as an OnboardDeviceRequest."""

    model_config = STRICT


class DeviceTypeBody(DeviceTypeView):
    """Body of `PUT /v1/device-types/{name}`."""

    model_config = STRICT


class BulkOnboardRequest(Body):
    """Body of `POST /v1/devices:bulk` (JSON form; CSV rows become the same)."""

    devices: Annotated[list[DeviceSpecBody], Field(min_length=1, max_length=MAX_BULK_DEVICES)]


class DevicePage(View):
    """One page of `GET /v1/devices`."""

    items: list[DeviceView]
    next_cursor: str | None


class OnboardingAccepted(View):
    """Answer of `POST /v1/devices` (202)."""

    workflow_id: str
    run_id: str | None
    status_url: str
    temporal_ui_url: str
    existing: bool = False


class BulkAccepted(View):
    """Answer of `POST /v1/devices:bulk` (202)."""

    bulk_id: str
    workflow_id: str
    total: int
    status_url: str
    temporal_ui_url: str
    existing: bool = False


class RotateBody(Body):
    """Body of `POST /v1/devices/{id}/credential:rotate` (optional): how long the replaced
    credentials stay valid (0: refused at once, e.g. a leaked one; default: the device type's)."""

    overlap_s: Annotated[int, Field(ge=0, le=MAX_CREDENTIAL_OVERLAP_S)] | None = None


class FleetRotateBody(RotateBody):
    """Body of `POST /v1/credential-rotations`: `device_ids`, or `device_type` and/or `tags`
    (every active device matching)."""

    device_ids: Annotated[list[DeviceId], Field(min_length=1, max_length=MAX_BULK_DECOMMISSION)] | None = None
    device_type: DeviceTypeName | None = None
    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)] = []


class RenewedCredential(View):
    """A new device credential, shown once: by renewal (`POST /v1/device/credential:renew`) or
    an operator's rotation of one device. The replaced ones work for the overlap."""

    device_id: str
    credential: str
    expires_at: datetime
    rotation_id: str


class RotationAccepted(View):
    """Answer of `POST /v1/credential-rotations` (202)."""

    rotation_id: str
    status_url: str
