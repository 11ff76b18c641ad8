"""The device service: registry, credentials, configuration and rollout jobs; owns the `device` schema.

Declarations only (see `fleetflow.interfaces`): safe to import in the workflow sandbox.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from temporalio import activity

from fleetflow.contracts.commands import CommandState, SettleCommand
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.consistency import FinishReconciliation, ReconciledPage, ReconcilePage
from fleetflow.contracts.devices import (
    BulkChunk,
    BulkChunkResult,
    DeviceBatch,
    DeviceTransition,
    IssueCredential,
    IssuedCredential,
    ProvisionDevice,
    ProvisionedDevice,
    RegisterDevice,
    RevokeCredential,
    RotateChunk,
    RotatedChunk,
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
    @abstractmethod
    @records("DevicesProvisioned")
    async def provision_batch(self, chunk: BulkChunk) -> BulkChunkResult:
        """Register, credential, configure and activate one slice of a bulk import.

        Each device is all-or-nothing (its own savepoint): a device that fails leaves
        nothing behind, and the others go on. A retry finds its own earlier work. It heartbeats
        per device: a cancelled slice rolls back and commits nothing.
        """

    @activity.defn(name="device.deprovision_batch")
    @abstractmethod
    @records("DevicesDeprovisioned")
    async def deprovision_batch(self, batch: DeviceBatch) -> None:
        """Compensation of `provision_batch` for the given devices of this bulk import (None: all).

        Set-based, a few statements whatever the count: undoing 10,000 devices one statement
        pair each could outlast the compensation's start-to-close timeout and retry for ever.
        A device decommissioned meanwhile stays so (as `mark_failed` leaves it): `failed` would
        let it be onboarded again.
        """

    @activity.defn(name="device.plan_rollout")
    @abstractmethod
    async def plan_rollout(self, inp: RolloutInput) -> RolloutPlan:
        """Fix the target list and its waves (once: a retry returns the recorded plan)."""

    @activity.defn(name="device.rollout_tick")
    @abstractmethod
    async def rollout_tick(self, tick: RolloutTick) -> TickResult:
        """Expire silent devices, check the abort criteria, offer new jobs, and count.

        Retry-safe: the campaign's row keeps the key of its last tick (run id and activity id,
        the same on every attempt) and what it decided, so a retry after the offer committed
        offers nothing more and returns the same offer and abort decision.
        """

    @activity.defn(name="device.stop_rollout")
    @abstractmethod
    async def stop_rollout(self, stop: StopRollout) -> int:
        """Cancel the jobs not started yet; with `rollback`, queue a rollback for every device
        that took the new firmware. Returns how many rollbacks are queued.
        """

    @activity.defn(name="device.settle_command")
    @abstractmethod
    async def settle_command(self, settle: SettleCommand) -> CommandState:
        """End a command as expired or timed out if it is still pending or delivered; answers
        where it stands (a device's answer or a decommission may have ended it first)."""

    @activity.defn(name="device.ping")
    @abstractmethod
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""

    @activity.defn(name="device.validate_onboarding")
    @abstractmethod
    async def validate_onboarding(self, request: ValidateOnboarding) -> ValidatedOnboarding:
        """Check the device type and configuration, and that the id is free."""

    @activity.defn(name="device.register")
    @abstractmethod
    @records("DeviceRegistered")
    async def register(self, request: RegisterDevice) -> None:
        """Register the device as `pending` for this onboarding (or find it already so)."""

    @activity.defn(name="device.validate_and_register")
    @abstractmethod
    @records("DeviceRegistered")
    async def validate_and_register(self, request: RegisterDevice) -> ValidatedOnboarding:
        """`validate_onboarding` then `register`, in one activity task (one round trip fewer).

        A refusal of the validation on the first attempt carries the detail "validate":
        nothing was registered (the workflow skips the undo of the registration).
        """

    @activity.defn(name="device.provision_device")
    @abstractmethod
    @records("DeviceProvisioned")
    async def provision_device(self, request: ProvisionDevice) -> ProvisionedDevice:
        """`validate_and_register`, then (type needs no approval) `issue_credential` and
        `store_config`, the writes in one transaction: one activity task for all four.

        A refusal of the validation on the first attempt carries the detail "validate" (nothing
        written); a retry finds its own earlier commit and returns the same credential.
        """

    @activity.defn(name="device.mark_failed")
    @abstractmethod
    @records("RegistrationFailed")
    async def mark_failed(self, request: DeviceTransition) -> None:
        """Compensation of `register`: this onboarding's registration becomes `failed`."""

    @activity.defn(name="device.issue_credential")
    @abstractmethod
    @records("CredentialIssued")
    async def issue_credential(self, request: IssueCredential) -> IssuedCredential:
        """Issue the device's credential; stored only as a hash, the token returned once."""

    @activity.defn(name="device.revoke_credential")
    @abstractmethod
    @records("CredentialRevoked")
    async def revoke_credential(self, request: RevokeCredential) -> None:
        """Revoke one credential (compensation of `issue_credential`); refused at once after."""

    @activity.defn(name="device.store_config")
    @abstractmethod
    @records("ConfigurationStored")
    async def store_config(self, request: StoreConfig) -> None:
        """Store the initial configuration and mark the device `provisioned`."""

    @activity.defn(name="device.remove_config")
    @abstractmethod
    @records("ConfigurationRemoved")
    async def remove_config(self, request: DeviceTransition) -> None:
        """Compensation of `store_config`."""

    @activity.defn(name="device.activate")
    @abstractmethod
    @records("DeviceActivated")
    async def activate(self, request: DeviceTransition) -> None:
        """The device made first contact: it becomes `active`."""

    @activity.defn(name="device.find_unready")
    @abstractmethod
    async def find_unready(self, ref: WindowRef) -> UnreadyDevices:
        """Note the devices of a telemetry window that may not send (unknown, or not active) in
        device.window_unready, keyed by the window; answers how many. Idempotent.
        """

    @activity.defn(name="device.revoke_all_credentials")
    @abstractmethod
    async def revoke_all_credentials(self, step: DeviceStep) -> int:
        """Revoke every credential of the device; refused from the next request on."""

    @activity.defn(name="device.cancel_jobs")
    @abstractmethod
    async def cancel_jobs(self, step: DeviceStep) -> int:
        """Cancel the device's pending rollout jobs and end its open commands."""

    @activity.defn(name="device.mark_decommissioned")
    @abstractmethod
    async def mark_decommissioned(self, step: DeviceStep) -> None:
        """The device is retired for good."""

    @activity.defn(name="device.note_retirement_problem")
    @abstractmethod
    async def note_retirement_problem(self, step: DeviceStep) -> None:
        """Say on the device itself that its retirement is stuck, and where."""

    @activity.defn(name="device.rotate_credentials")
    @abstractmethod
    async def rotate_credentials(self, chunk: RotateChunk) -> RotatedChunk:
        """Give the next chunk of selected devices a new credential (jti
        `<rotation id>:<device id>`, so a retry issues nothing twice); their other live
        credentials stay valid until the overlap ends. Outcomes per device in
        device.credential_rotations."""

    @activity.defn(name="device.reconcile_devices")
    @abstractmethod
    async def reconcile_devices(self, page: ReconcilePage) -> ReconciledPage:
        """Check one page of the registry (keyset by tenant, device id) against the twins and
        credentials: start missing twins, end retired devices' twins and revoke their
        credentials, report firmware mismatches; each finding a row of the run. Idempotent.
        """

    @activity.defn(name="device.finish_reconciliation")
    @abstractmethod
    async def finish_reconciliation(self, finish: FinishReconciliation) -> None:
        """Record the run's totals (the last run GET /v1/consistency shows); idempotent."""
