"""Bodies and answers of `/v1/devices` and `/v1/device-types`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from api.models.base import STRICT, Body, View
from fleetflow.contracts.devices import DeviceSpec, DeviceTypeView, DeviceView, OnboardDeviceRequest
from fleetflow.contracts.limits import MAX_BULK_DEVICES


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
