"""The device service: registry, credentials, configuration and rollout jobs; owns the `device` schema.

The typed interface workflows call (`workflow.execute_activity_method`); the implementation
is `activities/`, bound to these names by `fleetflow.interfaces.implements`. Importing this
module pulls in nothing but contracts, so the workflow sandbox may.
"""

from __future__ import annotations

from typing import ClassVar

from temporalio import activity

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.devices import (
    BulkChunk,
    BulkChunkResult,
    DeviceBatch,
    DeviceTransition,
    IssueCredential,
    IssuedCredential,
    RegisterDevice,
    RevokeCredential,
    StoreConfig,
    ValidatedOnboarding,
    ValidateOnboarding,
)
from fleetflow.contracts.rollouts import (
    DeviceStep,
    RolloutInput,
    RolloutPlan,
    RolloutTick,
    StopRollout,
    TickResult,
)
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import UnreadyDevices, WindowRef
from fleetflow.interfaces.base import ServiceInterface, records


class DeviceActivities(ServiceInterface):
    """Activities of the `device` task queue."""

    service: ClassVar[str] = "device"
    queue: ClassVar[TaskQueue] = TaskQueue.DEVICE

    @activity.defn(name="device.provision_batch")
    @records("DevicesProvisioned")
    async def provision_batch(self, chunk: BulkChunk) -> BulkChunkResult:
        """Register, credential, configure and activate one slice of a bulk import.

        Each device is all-or-nothing (its own savepoint): a device that fails leaves
        nothing behind, and the others go on. A retry finds its own earlier work. It heartbeats
        per device: a cancelled slice rolls back and commits nothing.
        """
        raise NotImplementedError

    @activity.defn(name="device.deprovision_batch")
    @records("DevicesDeprovisioned")
    async def deprovision_batch(self, batch: DeviceBatch) -> None:
        """Compensation of `provision_batch` for the given devices of this bulk import (None: all).

        Set-based, a few statements whatever the count: undoing 10,000 devices one statement
        pair each could outlast the compensation's start-to-close timeout and retry for ever.
        A device decommissioned meanwhile stays so (as `mark_failed` leaves it): `failed` would
        let it be onboarded again.
        """
        raise NotImplementedError

    @activity.defn(name="device.plan_rollout")
    async def plan_rollout(self, inp: RolloutInput) -> RolloutPlan:
        """Fix the target list and its waves (once: a retry returns the recorded plan)."""
        raise NotImplementedError

    @activity.defn(name="device.rollout_tick")
    async def rollout_tick(self, tick: RolloutTick) -> TickResult:
        """Expire silent devices, check the abort criteria, offer new jobs, and count.

        Retry-safe: the campaign's row keeps the key of its last tick (run id and activity id,
        the same on every attempt) and what it decided, so a retry after the offer committed
        offers nothing more and returns the same offer and abort decision.
        """
        raise NotImplementedError

    @activity.defn(name="device.stop_rollout")
    async def stop_rollout(self, stop: StopRollout) -> int:
        """Cancel the jobs not started yet; with `rollback`, queue a rollback for every device
        that took the new firmware. Returns how many rollbacks are queued.
        """
        raise NotImplementedError

    @activity.defn(name="device.ping")
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        raise NotImplementedError

    @activity.defn(name="device.validate_onboarding")
    async def validate_onboarding(self, request: ValidateOnboarding) -> ValidatedOnboarding:
        """Check the device type and configuration, and that the id is free."""
        raise NotImplementedError

    @activity.defn(name="device.register")
    @records("DeviceRegistered")
    async def register(self, request: RegisterDevice) -> None:
        """Register the device as `pending` for this onboarding (or find it already so)."""
        raise NotImplementedError

    @activity.defn(name="device.mark_failed")
    @records("RegistrationFailed")
    async def mark_failed(self, request: DeviceTransition) -> None:
        """Compensation of `register`: this onboarding's registration becomes `failed`."""
        raise NotImplementedError

    @activity.defn(name="device.issue_credential")
    @records("CredentialIssued")
    async def issue_credential(self, request: IssueCredential) -> IssuedCredential:
        """Issue the device's credential; stored only as a hash, the token returned once."""
        raise NotImplementedError

    @activity.defn(name="device.revoke_credential")
    @records("CredentialRevoked")
    async def revoke_credential(self, request: RevokeCredential) -> None:
        """Revoke one credential (compensation of `issue_credential`); refused at once after."""
        raise NotImplementedError

    @activity.defn(name="device.store_config")
    @records("ConfigurationStored")
    async def store_config(self, request: StoreConfig) -> None:
        """Store the initial configuration and mark the device `provisioned`."""
        raise NotImplementedError

    @activity.defn(name="device.remove_config")
    @records("ConfigurationRemoved")
    async def remove_config(self, request: DeviceTransition) -> None:
        """Compensation of `store_config`."""
        raise NotImplementedError

    @activity.defn(name="device.activate")
    @records("DeviceActivated")
    async def activate(self, request: DeviceTransition) -> None:
        """The device made first contact: it becomes `active`."""
        raise NotImplementedError

    @activity.defn(name="device.find_unready")
    async def find_unready(self, ref: WindowRef) -> UnreadyDevices:
        """Note the devices of a telemetry window that may not send (unknown, or not active) in
        device.window_unready, keyed by the window; answers how many. Idempotent.
        """
        raise NotImplementedError

    @activity.defn(name="device.revoke_all_credentials")
    async def revoke_all_credentials(self, step: DeviceStep) -> int:
        """Revoke every credential of the device; refused from the next request on."""
        raise NotImplementedError

    @activity.defn(name="device.cancel_jobs")
    async def cancel_jobs(self, step: DeviceStep) -> int:
        """Cancel the device's pending rollout jobs."""
        raise NotImplementedError

    @activity.defn(name="device.mark_decommissioned")
    async def mark_decommissioned(self, step: DeviceStep) -> None:
        """The device is retired for good."""
        raise NotImplementedError

    @activity.defn(name="device.note_retirement_problem")
    async def note_retirement_problem(self, step: DeviceStep) -> None:
        """Say on the device itself that its retirement is stuck, and where."""
        raise NotImplementedError
