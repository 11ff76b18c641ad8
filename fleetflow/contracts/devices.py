"""Contracts of the device service and of onboarding (single and bulk). The API's bodies and
answers of these routes are in `api/models/devices.py` and `api/models/onboardings.py`."""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, field_validator

from fleetflow.contracts.common import Actor, Contract, DeviceId, TenantId
from fleetflow.contracts.limits import (
    MAX_BULK_DECOMMISSION,
    MAX_CREDENTIAL_LIFETIME_DAYS,
    MAX_CREDENTIAL_OVERLAP_S,
    MAX_TAGS,
    Reason,
)

# the limits of a device are defined in limits; they stay importable from here
from fleetflow.contracts.limits import MAX_BULK_DEVICES as MAX_BULK_DEVICES
from fleetflow.contracts.limits import MAX_CONFIG_BYTES as MAX_CONFIG_BYTES
from fleetflow.contracts.limits import MAX_METADATA_BYTES as MAX_METADATA_BYTES
from fleetflow.contracts.limits import MAX_SPEC_DEPTH as MAX_SPEC_DEPTH
from fleetflow.contracts.limits import DeviceTypeName as DeviceTypeName
from fleetflow.contracts.limits import FirmwareVersion as FirmwareVersion
from fleetflow.contracts.limits import Tag as Tag


def attempt_owner(business_id: str, run_id: str) -> str:
    """The owner key one attempt of an onboarding writes on its device rows and credentials.

    `<business id>/<first run id>`: the business id (workflow id, bulk id) stays the same
    across attempts, so it alone cannot tell this attempt's work from an earlier one's.
    """
    return f"{business_id}/{run_id}"


def business_id_of(owner: str) -> str:
    """The business id of an owner key (an owner written before attempts existed is one)."""
    return owner.split("/", 1)[0]


def _json_size(value: dict[str, Any]) -> int:
    return len(json.dumps(value, separators=(",", ":")).encode())


def _too_deep(value: Any) -> bool:
    """True when value nests objects/arrays more than MAX_SPEC_DEPTH deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            if level > MAX_SPEC_DEPTH:
                return True
            stack.extend((v, level + 1) for v in (node.values() if isinstance(node, dict) else node))
    return False


class DeviceStatus(StrEnum):
    """Lifecycle: pending → provisioned → active → decommissioned (or failed)."""

    PENDING = "pending"
    PROVISIONED = "provisioned"
    ACTIVE = "active"
    DECOMMISSIONED = "decommissioned"
    FAILED = "failed"


class DeviceSpec(Contract):
    """A device as an operator describes it for onboarding."""

    device_id: DeviceId
    device_type: DeviceTypeName
    firmware_version: FirmwareVersion = "0.0.0"
    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _too_deep(value):
            raise ValueError(f"must nest at most {MAX_SPEC_DEPTH} levels deep")
        if _json_size(value) > MAX_METADATA_BYTES:
            raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
        return value

    @field_validator("config")
    @classmethod
    def _config_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and _too_deep(value):
            raise ValueError(f"must nest at most {MAX_SPEC_DEPTH} levels deep")
        if value is not None and _json_size(value) > MAX_CONFIG_BYTES:
            raise ValueError(f"must be at most {MAX_CONFIG_BYTES} bytes as JSON")
        return value


class OnboardDeviceRequest(DeviceSpec):
    """A device to onboard and the onboarding's timeouts: the `request` of OnboardingInput (the
    API's body is its strict form, api.models.devices.OnboardDeviceBody)."""

    first_contact_timeout_s: Annotated[int, Field(ge=1, le=7 * 86400)] = 600
    approval_timeout_s: Annotated[int, Field(ge=1, le=30 * 86400)] = 86400


class DeviceTypeView(Contract):
    """A device type: its configuration schema and whether onboarding needs approval."""

    name: DeviceTypeName
    config_schema: dict[str, Any]
    default_config: dict[str, Any] = Field(default_factory=dict)
    requires_approval: bool = False
    # None: the platform's defaults (365 days; settings.credential_overlap_s)
    credential_lifetime_days: Annotated[int, Field(ge=1, le=MAX_CREDENTIAL_LIFETIME_DAYS)] | None = None
    credential_overlap_s: Annotated[int, Field(ge=0, le=MAX_CREDENTIAL_OVERLAP_S)] | None = None


class OnboardingStep(StrEnum):
    """The steps of the onboarding saga, in order."""

    VALIDATE = "validate"
    REGISTER = "register"
    AWAIT_APPROVAL = "await_approval"
    ISSUE_CREDENTIAL = "issue_credential"
    STORE_CONFIG = "store_config"
    AWAIT_FIRST_CONTACT = "await_first_contact"
    ACTIVATE = "activate"
    RECORD_EVENT = "record_event"


class OnboardingInput(Contract):
    """Input of the DeviceOnboarding workflow."""

    tenant: TenantId
    actor: Actor
    request: OnboardDeviceRequest
    request_hash: str


class OnboardingProgress(Contract):
    """The `progress` query of DeviceOnboarding."""

    workflow_id: str
    tenant: str
    device_id: str
    status: str
    current_step: OnboardingStep | None
    completed_steps: list[OnboardingStep]
    compensations: list[str]
    reason: str | None = None
    decided_by: str | None = None
    credential: str | None = None


class OnboardingResult(Contract):
    """Output of a DeviceOnboarding that completed."""

    tenant: str
    device_id: str
    status: DeviceStatus
    credential_jti: str


class ApprovalDecision(Contract):
    """Argument of the `approve` and `reject` updates."""

    actor: Actor
    reason: Reason | None = None


class FirstContact(Contract):
    """Signal `first_contact`: the device called in with its new credential."""

    jti: str
    at: datetime
    firmware_version: FirmwareVersion | None = None


class ValidateOnboarding(Contract):
    """Input of `device.validate_onboarding`."""

    tenant: TenantId
    spec: DeviceSpec


class ValidatedOnboarding(Contract):
    """The configuration to apply (type defaults merged) and whether approval is needed."""

    config: dict[str, Any]
    requires_approval: bool
    # the device type's schema, for the twin; absent from results recorded before the twin existed
    config_schema: dict[str, Any] = Field(default_factory=dict)
    # the device type's credential lifetime; absent from results recorded before it was per type
    credential_lifetime_days: int | None = None


class RegisterDevice(Contract):
    """Input of `device.register`."""

    tenant: TenantId
    spec: DeviceSpec
    onboarding_id: str
    actor: str


class DeviceTransition(Contract):
    """Input of the status-changing activities; only touches the given onboarding's device."""

    tenant: TenantId
    device_id: str
    onboarding_id: str
    actor: str
    reason: str | None = None
    firmware_version: FirmwareVersion | None = None


class IssueCredential(Contract):
    """Input of `device.issue_credential`; the same input gives the same credential."""

    tenant: TenantId
    device_id: str
    onboarding_id: str
    jti: str
    issued_at: datetime
    expires_at: datetime


class IssuedCredential(Contract):
    """A credential, returned once to whoever onboards the device."""

    jti: str
    token: str
    expires_at: datetime


class RevokeCredential(Contract):
    """Input of `device.revoke_credential`."""

    tenant: TenantId
    device_id: str
    jti: str
    reason: str


class StoreConfig(Contract):
    """Input of `device.store_config`."""

    tenant: TenantId
    device_id: str
    onboarding_id: str
    config: dict[str, Any]
    actor: str


class ProvisionDevice(Contract):
    """Input of `device.provision_device`: validate, register and, when the type needs no approval,
    issue the credential `jti` and store the configuration, in one transaction."""

    tenant: TenantId
    spec: DeviceSpec
    onboarding_id: str
    actor: str
    jti: str
    issued_at: datetime
    # the lifetime when the device type names none
    expires_at: datetime


class ProvisionedDevice(Contract):
    """Result of `device.provision_device`; `credential` is None when the type needs approval
    (then only the registration was written)."""

    validated: ValidatedOnboarding
    credential: IssuedCredential | None = None


class DeviceView(Contract):
    """A device as the API shows it."""

    tenant: str
    device_id: str
    device_type: str
    firmware_version: str
    tags: list[str]
    metadata: dict[str, Any]
    status: DeviceStatus
    status_reason: str | None
    onboarding_id: str
    created_at: datetime
    updated_at: datetime


# --- bulk onboarding ---------------------------------------------------------


class BulkOnboardingInput(Contract):
    """Input of BulkOnboarding: a claim check on the stored device list, never the list."""

    tenant: TenantId
    actor: Actor
    bulk_id: str
    claim_id: str
    total: int
    # 500 keeps a slice's result (device ids, failures) far below 256 KiB in history
    chunk_size: Annotated[int, Field(ge=1, le=5000)] = 500


class BulkChunk(Contract):
    """Input of `device.provision_batch`: rows [offset, offset+limit) of the claim."""

    tenant: TenantId
    bulk_id: str
    claim_id: str
    offset: int
    limit: int
    actor: str
    issued_at: datetime
    expires_at: datetime
    # the device type's credential lifetime, where it has one, instead of expires_at (runs
    # recorded before it was per type send False)
    lifetime_per_type: bool = False


class DeviceFailure(Contract):
    """A device of a bulk onboarding that did not make it, and why."""

    index: int
    device_id: str
    reason: str


class BulkChunkResult(Contract):
    """What one batch did: the devices onboarded (with their credential jti) and the failures."""

    onboarded: list[str]
    failed: list[DeviceFailure]


class DeviceBatch(Contract):
    """Devices of one bulk onboarding, for batch compensation."""

    tenant: TenantId
    bulk_id: str
    device_ids: list[str] | None = Field(
        default=None, description="None: every device this bulk import registered"
    )
    reason: str
    actor: str


class BulkProgress(Contract):
    """The `progress` query of BulkOnboarding."""

    bulk_id: str
    status: str
    total: int
    processed: int
    onboarded: int
    failed: int
    failures: list[DeviceFailure]
    reason: str | None = None


DEFAULT_CREDENTIAL_LIFETIME_DAYS = 365


class RotateCredentials(Contract):
    """Input of CredentialRotation (id `credential-rotation-{tenant}-{rotation_id}`): give each
    selected device a new credential; its current ones stay valid for `overlap_s` more (None:
    the device type's overlap, else the platform's), then the check refuses them.

    Selection: `device_ids`, or `device_type` and/or `tags` (every active device matching). A
    device's renewal names the credential it presented (`from_jti`); only that device.
    `after` and the counts carry a fleet's progress across continue-as-new.
    """

    tenant: TenantId
    rotation_id: Annotated[str, Field(max_length=200)]
    actor: str
    device_ids: Annotated[list[DeviceId], Field(max_length=MAX_BULK_DECOMMISSION)] | None = None
    # a fleet's device ids stored once in fleetflow.claim_checks (instead of `device_ids`, which
    # would travel in the run's input and again in every step's), read back by the activity
    ids_claim: str | None = None
    device_type: DeviceTypeName | None = None
    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)] = []
    from_jti: str | None = None
    overlap_s: Annotated[int, Field(ge=0, le=MAX_CREDENTIAL_OVERLAP_S)] | None = None
    issued_at: datetime | None = None  # set once by the workflow: a retried step signs the same
    after: str = ""
    rotated: int = 0
    skipped: int = 0


class RotateChunk(Contract):
    """Input of `device.rotate_credentials`: the next `limit` selected devices after `after`."""

    request: RotateCredentials
    limit: Annotated[int, Field(ge=1, le=1000)] = 200


class RotatedChunk(Contract):
    """Output of `device.rotate_credentials`; per-device outcomes are in device.credential_rotations."""

    rotated: int
    skipped: int
    last: str  # the last device id of the chunk ('' when none)
    done: bool


class RotationView(Contract):
    """A credential rotation's progress and per-device outcomes (`GET /v1/credential-rotations/{id}`)."""

    rotation_id: str
    status: str
    rotated: int
    skipped: int
    devices: list[dict[str, Any]]
