"""Bodies and answers of `/v1/onboardings` and `/v1/device-contact`."""

from __future__ import annotations

from api.models.base import Body, View
from fleetflow.contracts.limits import FirmwareVersion, Reason


class Decision(Body):
    """Body of an operator's decision on a run (approve, reject, cancel): an optional reason."""

    reason: Reason | None = None


class Contact(Body):
    """Body of `POST /v1/device-contact`."""

    firmware_version: FirmwareVersion | None = None


class ContactAccepted(View):
    """Answer of `POST /v1/device-contact`."""

    device_id: str
    status: str
