"""Contracts of firmware, rollout campaigns and decommissioning, and a device's job report. The
API's bodies of these routes are in `api/models/rollouts.py`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from fleetflow.contracts.commands import CampaignCommand
from fleetflow.contracts.common import Actor, Contract, DeviceId, Strict, TenantId
from fleetflow.contracts.limits import MAX_TARGET_DEVICES, MAX_TARGET_TAGS, DeviceTypeName, Reason, Tag
from fleetflow.contracts.limits import CampaignId as CampaignId  # defined in limits

JobKind = Literal["update", "rollback"]
DeviceProgress = Literal["downloading", "installing", "succeeded", "failed"]
# a job's life: queued → offered → downloading → installing → succeeded | failed | timed_out;
# queued or offered jobs of a stopped campaign become cancelled
ACTIVE_STATES = ("offered", "downloading", "installing")
FINAL_STATES = ("succeeded", "failed", "timed_out", "cancelled")

FIRMWARE_UPDATED = "FirmwareUpdated"
FIRMWARE_UPDATE_FAILED = "FirmwareUpdateFailed"
FIRMWARE_ROLLED_BACK = "FirmwareRolledBack"
DEVICE_DECOMMISSIONED = "DeviceDecommissioned"
ROLLOUT_HISTORY_LIMIT = 4000


class FirmwareView(Contract):
    """A stored firmware image."""

    firmware_id: str
    device_type: str
    version: str
    sha256: str
    size: int
    uploaded_at: datetime


class RolloutTarget(Contract):
    """Which devices a campaign updates: explicit ids, or a device type with tags."""

    device_ids: Annotated[list[DeviceId], Field(max_length=MAX_TARGET_DEVICES)] | None = None
    tags: Annotated[list[Tag], Field(max_length=MAX_TARGET_TAGS)] = Field(default_factory=list)


class RolloutPolicy(Contract):
    """Waves, pace and abort criteria of a campaign."""

    canary: Annotated[int, Field(ge=1)] = 10
    canary_percent: Annotated[float, Field(gt=0, le=100)] | None = None
    growth: Annotated[float, Field(ge=1, le=100)] = 4.0
    rate_per_minute: Annotated[float, Field(gt=0, le=1_000_000)] = 1000.0
    wave_success_percent: Annotated[float, Field(ge=0, le=100)] = 90.0
    abort_failure_percent: Annotated[float, Field(gt=0, le=100)] = 20.0
    abort_min_finished: Annotated[int, Field(ge=1)] = 10
    device_timeout_s: Annotated[int, Field(ge=1, le=7 * 86400)] = 600
    retry_limit: Annotated[int, Field(ge=0, le=10)] = 1


class RolloutRequest(Contract):
    """A campaign: the `request` of RolloutInput (the API's body is its strict form,
    api.models.rollouts.RolloutBody)."""

    campaign_id: CampaignId
    firmware_id: str = ""
    target: RolloutTarget = Field(default_factory=RolloutTarget)
    policy: RolloutPolicy = Field(default_factory=RolloutPolicy)
    # a command campaign: every targeted device of device_type gets this command instead
    command: CampaignCommand | None = None
    device_type: DeviceTypeName | None = None

    @model_validator(mode="after")
    def _target(self) -> RolloutRequest:
        if self.target.device_ids is not None and not self.target.device_ids:
            raise ValueError("target.device_ids must not be empty when given")
        return self


class TargetClaim(Contract):
    """An explicit target list stored in `fleetflow.claim_checks`: workflows carry its id and size."""

    claim_id: str
    count: int


class RolloutInput(Contract):
    """Input of FirmwareRollout (and what it carries when it continues as new: all of its state)."""

    tenant: TenantId
    actor: Actor
    request: RolloutRequest  # its target.device_ids travel as `targets`, never in history
    state: RolloutProgress | None = None
    targets: TargetClaim | None = None
    paused: bool = False  # an operator paused the campaign
    stop: str | None = None  # an operator cancelled it (the reason): the run must stop
    # continue as new past this many history events; tests lower it
    history_limit: Annotated[int, Field(ge=1, le=9000)] = ROLLOUT_HISTORY_LIMIT


class RolloutPlan(Contract):
    """Output of `device.plan_rollout`: the fixed target list, split into waves."""

    total: int
    waves: list[int]
    device_type: str
    version: str


class RolloutTick(Contract):
    """Input of `device.rollout_tick`: offer up to `offer` jobs of waves ≤ `wave`, expire, count."""

    tenant: TenantId
    campaign_id: str
    kind: JobKind
    wave: int
    offer: int
    device_timeout_s: int
    retry_limit: int
    finished_after: int
    abort_failure_percent: float | None = None
    abort_min_finished: int = 1
    # wait (in the activity) up to this long for a device to finish before acting: the
    # pace of the campaign without sub-second workflow timers, which fire late here
    wait_ms: Annotated[int, Field(ge=0, le=10_000)] = 0
    # the campaign stopped: queued and offered jobs are cancelled, silent ones time out (never
    # offered again), and every update that succeeded, even after the stop, gets its rollback
    stopped: bool = False
    # finished jobs to return (None: 200, what runs started before it record in one activity)
    finished_limit: Annotated[int, Field(ge=1, le=1000)] | None = None


class JobOutcome(Contract):
    """A job that reached a final state."""

    device_id: str
    state: str
    version: str
    seq: int


class TickResult(Contract):
    """Output of `device.rollout_tick`: counts by state and the newly finished jobs."""

    offered: int
    counts: dict[str, int]
    wave_counts: dict[str, int]
    finished: list[JobOutcome]
    abort: bool = False
    abort_seen_at: datetime | None = None  # when the tick found the threshold crossed (and offered nothing)
    # the last finished_seq this tick read, cancelled jobs included: the caller's next cursor
    finished_through: int | None = None


class StopRollout(Contract):
    """Input of `device.stop_rollout`: cancel what has not started, queue the rollbacks."""

    tenant: TenantId
    campaign_id: str
    rollback: bool


class RolloutDecision(Contract):
    """Argument of the pause / resume / cancel updates."""

    actor: Actor
    reason: Reason | None = None


class RolloutProgress(Contract):
    """Query `progress` of FirmwareRollout."""

    campaign_id: str
    status: Literal[
        "planning",
        "running",
        "paused",
        "aborting",
        "cancelling",
        "rolling_back",
        "completed",
        "aborted",
        "cancelled",
    ]
    wave: int
    waves: list[int]
    total: int
    counts: dict[str, int]
    rollback_counts: dict[str, int] = Field(default_factory=dict)
    reason: str | None = None
    finished_seq: int = 0
    rollback_seq: int = 0
    offered_budget: float = 0.0
    last_tick: datetime | None = None
    abort_crossed_at: datetime | None = None
    last_offer_at: datetime | None = None


RolloutInput.model_rebuild()


class JobView(Contract):
    """A device's pending job, as `GET /v1/device/jobs` shows it."""

    campaign_id: str
    kind: JobKind
    state: str
    firmware_id: str
    version: str
    sha256: str
    size: int
    download_url: str


class CampaignDeviceView(Contract):
    """One device's outcome in a campaign (`GET /v1/rollouts/{id}/devices`); a command campaign's
    shows the device's last command of it and its answer."""

    device_id: str
    state: str
    attempts: int
    detail: str | None = None
    updated_at: datetime
    command_id: str | None = None
    command_status: str | None = None
    result: dict[str, Any] | None = None


class JobReport(Strict):
    """A device's progress on a job: the body of `POST /v1/device/jobs/{campaign_id}/progress`
    and the payload of the MQTT gateway's job topic, so it is shared here and strict at both
    edges (it never travels through Temporal)."""

    kind: JobKind = "update"
    state: DeviceProgress
    detail: Reason | None = None


class DecommissionInput(Contract):
    """Input of DeviceDecommission."""

    tenant: TenantId
    device_id: str
    actor: Actor
    telemetry: Literal["archive", "delete"] = "archive"
    reason: str | None = None


class DeviceStep(Contract):
    """Input of the decommission activities."""

    tenant: TenantId
    device_id: str
    actor: str
    telemetry: Literal["archive", "delete"] = "archive"
    reason: str | None = None


class DecommissionProgress(Contract):
    """Query `progress` of DeviceDecommission."""

    device_id: str
    status: Literal["running", "completed", "stuck"]
    done: list[str]
    current: str | None
    error: str | None = None
