"""Bodies of `/v1/rollouts` and decommissioning (a device's job report is
fleetflow.contracts.rollouts.JobReport, shared with the MQTT gateway)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from api.models.base import STRICT, Body
from fleetflow.contracts.commands import CampaignCommand
from fleetflow.contracts.limits import MAX_BULK_DECOMMISSION, DeviceId, Reason
from fleetflow.contracts.rollouts import RolloutPolicy, RolloutRequest, RolloutTarget


class RolloutTargetBody(RolloutTarget):
    """`target` of a rollout body."""

    model_config = STRICT


class RolloutPolicyBody(RolloutPolicy):
    """`policy` of a rollout body."""

    model_config = STRICT


class CampaignCommandBody(CampaignCommand):
    """`command` of a command campaign's body."""

    model_config = STRICT


class RolloutBody(RolloutRequest):
    """Body of `POST /v1/rollouts`; the run gets it as a RolloutRequest."""

    model_config = STRICT

    # the contract's fields, refusing unknown fields inside them too
    target: RolloutTargetBody = Field(default_factory=RolloutTargetBody)
    policy: RolloutPolicyBody = Field(default_factory=RolloutPolicyBody)
    command: CampaignCommandBody | None = None

    @model_validator(mode="after")
    def _firmware_or_command(self) -> RolloutBody:
        if self.command is None and not self.firmware_id:
            raise ValueError("firmware_id is required (or a command and its device_type)")
        if self.command is not None and (self.firmware_id or self.device_type is None):
            raise ValueError("a command campaign names a device_type and no firmware_id")
        return self


class DecommissionRequest(Body):
    """Body of `POST /v1/devices/{id}:decommission` (and each item of the bulk form)."""

    telemetry: Literal["archive", "delete"] = "archive"
    reason: Reason | None = None


class BulkDecommissionRequest(Body):
    """Body of `POST /v1/devices:decommission`."""

    device_ids: Annotated[list[DeviceId], Field(min_length=1, max_length=MAX_BULK_DECOMMISSION)]
    telemetry: Literal["archive", "delete"] = "archive"
    reason: Reason | None = None
